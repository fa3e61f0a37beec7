"""A bare Flask-on-gevent hello world: the CPU-per-request floor the appliance is held to.

It runs on the appliance's own stack (patched gevent, pywsgi with the appliance's listener,
Flask) and does nothing else, so "appliance CPU / hello world CPU" is what the proxying costs
on top of hosting a Flask route at all. It answers the paths the harness posts to.
"""

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)

import sys

from flask import Flask
from gevent.pywsgi import WSGIServer

from app.netutil import make_listener

app = Flask("hello")


@app.route("/", methods=["GET", "POST", "HEAD"])
@app.route("/api/generate", methods=["POST"])
@app.route("/v1/chat/completions", methods=["POST"])
def hello() -> tuple[str, int, dict[str, str]]:
    return '{"response": "hello", "done": true}', 200, {"Content-Type": "application/json"}


if __name__ == "__main__":
    WSGIServer(make_listener("127.0.0.1", int(sys.argv[1])), app, log=None).serve_forever()
