"""Peak RSS of `levante serve` when one client posts a 64 MiB chat body, for each source tree given.

    python benchmarks/serve_body_memory.py MODEL TREE [TREE...]   (TREE: a levante checkout, used as PYTHONPATH)

Each tree serves MODEL on a loopback port; the script reads the server's RSS before and its peak (VmHWM) after.
"""
import json, os, socket, subprocess, sys, time
import httpx

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def status(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

def run(tree, model):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.Popen([sys.executable, "-m", "levante", "serve", "-m", model, "--dtype", "float32", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200: break
            except httpx.TransportError: pass
            time.sleep(0.5)
        before = status(proc.pid, "VmRSS:")
        body = json.dumps({"messages": [{"role": "user", "content": "x" * (64 << 20)}], "max_tokens": 1}).encode()
        started = time.monotonic()
        r = httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=600)
        seconds = time.monotonic() - started
        peak = status(proc.pid, "VmHWM:")
        return r.status_code, before, peak, seconds, r.text[:120]
    finally:
        proc.terminate(); proc.wait(30)

model = sys.argv[1]
for tree in sys.argv[2:]:
    code, before, peak, seconds, text = run(tree, model)
    print(f"{tree}: status {code} in {seconds:.1f} s, RSS {before:.0f} MiB before, peak {peak:.0f} MiB "
          f"(+{peak - before:.0f} MiB): {text}")
