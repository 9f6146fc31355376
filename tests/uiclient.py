"""What the HTTP-level tests of `tunelab ui` share (tests/test_ui*.py); their `folders` and `ui`
fixtures are in conftest.py."""

import time

BASE = "http://127.0.0.1:7860"
"""The address the test client speaks as: the app's own, so the Host and Origin checks pass."""
SCRIPT = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def wait_for(client, url: str, text: str, timeout: float = 120) -> str:
    """The page at `url` once it holds `text` (a job's page fills in as the job runs), or as it is
    at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        page = client.get(url).text
        if text in page or time.monotonic() > deadline:
            return page
        time.sleep(0.3)


def refused_across_sites(client, url: str, body: dict) -> bool:
    """Whether `url` refuses `body` without the token, with a wrong one, and from another site."""
    answers = [client.post(url, json=body, headers={"X-Tunelab-Token": ""}),
               client.post(url, json=body, headers={"X-Tunelab-Token": "guess"}),
               client.post(url, json=body, headers={"Origin": "http://evil.example"}),
               client.post(url, json=body, headers={"Sec-Fetch-Site": "cross-site"}),
               client.post(url, json=body, headers={"Host": "evil.example"})]
    return all(answer.status_code == 403 for answer in answers)
