"""`tunelab ui`: the whole loop (data, training, evaluation, chat) in a local web app.

guard.py keeps it safe on localhost, jobs.py runs each `tunelab` command as a job with its
state on disk, runs.py and follow.py read the folders, app.py serves the pages."""
