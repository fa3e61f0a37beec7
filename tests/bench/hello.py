"""A bare Flask-on-gevent hello world: the CPU-per-request floor the appliance is held to."""

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)

import sys

from flask import Flask
from gevent.pywsgi import WSGIServer

from app.netutil import make_listener

app = Flask("hello")


@app.route("/", methods=["GET", "POST", "HEAD"])
@app.route("/api/generate", methods=["POST"])
def hello() -> tuple[str, int, dict[str, str]]:
    return '{"response": "hello", "done": true}', 200, {"Content-Type": "application/json"}


if __name__ == "__main__":
    WSGIServer(make_listener("127.0.0.1", int(sys.argv[1])), app, log=None).serve_forever()
