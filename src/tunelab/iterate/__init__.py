"""Iterating on a fine-tune: what more data would buy (`tunelab curve`) and which settings win (`tunelab sweep`)."""
