"""The ceiling: a bare Flask endpoint that reads the body and answers, nothing else."""

from flask import Flask, request

app = Flask("ceiling")


@app.post("/webhooks/standard")
def receive() -> tuple[str, int]:
    request.get_data()
    return '{"accepted": 1, "duplicates": 0}', 202


@app.get("/healthz")
def healthz() -> str:
    return "ok"
