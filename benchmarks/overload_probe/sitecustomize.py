"""Measurement probe (not project code): timestamps per request inside the server, written as JSON lines
to $BURST_PROBE_OUT. time.monotonic() is system-wide on Linux, so it lines up with the client's."""

import asyncio
import contextvars
import json
import os
import threading
import time

OUT = os.environ.get("BURST_PROBE_OUT")
if OUT:
    _f = open(OUT, "a", buffering=1)  # noqa: SIM115 (open for the process's life)
    _cur = contextvars.ContextVar("burst_t", default=None)
    mono = time.monotonic
    _sel = [0.0]  # seconds the loop thread spent idle inside select()/epoll (minus its runqueue wait there)
    _tid = [None]

    def rq():
        with open(f"/proc/self/task/{_tid[0]}/schedstat") as fh:
            return int(fh.read().split()[1]) / 1e9

    def counters():
        """monotonic, loop-thread CPU, runqueue wait, in-select time (s)."""
        try:
            with open(f"/proc/self/task/{_tid[0]}/schedstat") as fh:
                wait_ns = fh.read().split()[1]
        except Exception:
            wait_ns = "0"
        return [mono(), time.thread_time(), int(wait_ns) / 1e9, _sel[0]]

    import qwen_gateway.edge as edge

    P = edge.GuardedHttpToolsProtocol
    _cm, _dr, _hc, _mc = P.connection_made, P.data_received, P.on_headers_complete, P.on_message_complete

    def connection_made(self, transport):
        self._bt_accept = mono()
        self._bt_first = None
        return _cm(self, transport)

    def data_received(self, data):
        if getattr(self, "_bt_first", 1) is None:
            self._bt_first = mono()
            self._bt_c0 = counters()
        return _dr(self, data)

    def on_headers_complete(self):
        t = mono()
        _hc(self)
        if self.cycle is not None:
            self.cycle.scope["_bt"] = {
                "accept": self._bt_accept,
                "first_byte": self._bt_first,
                "head": t,
                "k0": getattr(self, "_bt_c0", None),
                "peer": self.client[1] if self.client else None,
            }
            self._bt_first = None

    def on_message_complete(self):
        if self.cycle is not None and "_bt" in self.cycle.scope:
            self.cycle.scope["_bt"]["msg"] = mono()
        return _mc(self)

    P.connection_made, P.data_received, P.on_headers_complete, P.on_message_complete = (
        connection_made,
        data_received,
        on_headers_complete,
        on_message_complete,
    )

    import uvicorn.protocols.http.httptools_impl as hi

    _send = hi.RequestResponseCycle.send

    async def send(self, message):
        bt = self.scope.get("_bt")
        await _send(self, message)
        if bt is not None:
            if message["type"] == "http.response.start":
                bt["start"] = mono()
                bt["status"] = message["status"]
            elif not message.get("more_body", False):
                bt["written"] = mono()
                bt["k1"] = counters()
                bt["rid"] = self.scope.get("state", {}).get("request_id")
                bt["path"] = self.scope.get("path")
                _f.write(json.dumps(bt) + "\n")

    hi.RequestResponseCycle.send = send

    import qwen_gateway.api.middleware as mw

    _call = mw.RequestIdMiddleware.__call__

    async def call(self, scope, receive, send):
        bt = scope.get("_bt")
        if bt is not None:
            bt["app"] = mono()
            _cur.set(bt)
        return await _call(self, scope, receive, send)

    mw.RequestIdMiddleware.__call__ = call

    import qwen_gateway.api.deps as deps

    _rk = deps.require_key

    async def require_key(request):
        bt = _cur.get()
        if bt is not None:
            bt["auth0"] = mono()
        try:
            return await _rk(request)
        finally:
            if bt is not None:
                bt["auth1"] = mono()

    require_key.__wrapped__ = _rk
    deps.require_key = require_key

    import qwen_gateway.api.routes.chat as chat

    _rb = chat.read_body

    async def read_body(request, limit):
        bt = _cur.get()
        if bt is not None:
            bt["route"] = mono()
        b = await _rb(request, limit)
        if bt is not None:
            bt["body"] = mono()
        return b

    chat.read_body = read_body

    import qwen_gateway.service.admission as adm

    _rif = adm.Admission.refuse_if_full

    def refuse_if_full(self, n=1):
        bt = _cur.get()
        if bt is not None:
            bt["refuse_check"] = mono()
        return _rif(self, n)

    adm.Admission.refuse_if_full = refuse_if_full

    if os.environ.get("BURST_NICE"):
        import qwen_gateway.engines.local.scheduler as sch

        _run = sch.Scheduler._run

        def run_niced(self):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(os.environ["BURST_NICE"]))
            return _run(self)

        sch.Scheduler._run = run_niced

    # Event-loop lag: a 5 ms ticker; late wake-ups logged with their time.
    def _start_lag():
        _tid[0] = threading.get_native_id()
        loop = asyncio.get_running_loop()
        sel = getattr(loop, "_selector", None)
        if sel is not None:
            orig = sel.select

            def select(timeout=None):
                t = time.perf_counter()
                q = rq()
                try:
                    return orig(timeout)
                finally:
                    _sel[0] += time.perf_counter() - t - (rq() - q)

            sel.select = select

        async def tick():
            while True:
                t0 = mono()
                await asyncio.sleep(0.005)
                lag = mono() - t0 - 0.005
                if lag > 0.004:
                    _f.write(json.dumps({"lag": lag, "at": t0}) + "\n")

        asyncio.get_running_loop().create_task(tick())

    import qwen_gateway.server as srv

    _serve = srv.GatewayServer.serve

    async def serve(self, sockets=None):
        _start_lag()
        if os.environ.get("BURST_SWITCH"):
            __import__("sys").setswitchinterval(float(os.environ["BURST_SWITCH"]))
        _f.write(json.dumps({"switchinterval": __import__("sys").getswitchinterval()}) + "\n")
        return await _serve(self, sockets=sockets)

    srv.GatewayServer.serve = serve
