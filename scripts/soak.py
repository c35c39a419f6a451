"""The soak's driver (run by scripts/soak): one minute at a time, the mixed
load, then one row of the node's vital signs. Exits non-zero if a request
went unanswered or a bid leg reported errors."""

import argparse
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request


def call(target, method, path, body=None, token=None):
    request = urllib.request.Request(f"http://{target}{path}", method=method)
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def vitals(pid, target):
    status = open(f"/proc/{pid}/status").read()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    files = len(os.listdir(f"/proc/{pid}/fd"))
    metrics = urllib.request.urlopen(f"http://{target}/metrics", timeout=10).read().decode()

    def gauge(name):
        found = re.search(rf"^{name} (\S+)$", metrics, re.M)
        return int(float(found.group(1))) if found else 0

    return {
        "rss_mib": rss_kib // 1024,
        "open_files": files,
        "threads": threads,
        "connections": gauge("gavel_http_connections"),
        "live_auctions": gauge("gavel_live_auctions"),
    }


def side_load(target, stop, counts, minute):
    """Registrations, sign-ins and reads, a few a second, until `stop`."""
    auctions = []
    index = 0
    while not stop.is_set():
        name = f"soak{minute}x{index}"
        status, body = call(target, "POST", "/api/v1/auth/register", {"username": name, "password": "soak-password"})
        counts[status] = counts.get(status, 0) + 1
        status, body = call(target, "POST", "/api/v1/auth/login", {"username": name, "password": "soak-password"})
        counts[status] = counts.get(status, 0) + 1
        if not auctions:
            status, page = call(target, "GET", "/api/v1/auctions?limit=50")
            auctions = [item["id"] for item in (page or {}).get("items", [])]
        for auction in auctions[index % max(len(auctions), 1):][:5]:
            for path in (f"/api/v1/auctions/{auction}", f"/api/v1/auctions/{auction}/bids?limit=20"):
                status, _ = call(target, "GET", path)
                counts[status] = counts.get(status, 0) + 1
        index += 1
        stop.wait(0.2)


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--target", "--bench", "--work"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--rate", type=int, default=200)
    options = parser.parse_args()
    print(f"soak: {options.minutes} min on {options.target}: bids {options.rate}/s over 1,000 auctions a minute, "
          "200 watchers that come and go, reads, registrations and sign-ins")
    print("| minute | RSS MiB | open files | threads | connections | live auctions | bids accepted | bid p99 ms | other answers |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    failed = False
    for minute in range(1, options.minutes + 1):
        bids = subprocess.Popen(
            [options.bench, "many_auctions", "--target", options.target, "--rate", str(options.rate),
             "--seconds", "50", "--connections", "16", "--auctions", "1000", "--zipf", "1.0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watchers = subprocess.Popen(
            [options.bench, "ws_idle", "--target", options.target, "--connections", "200", "--seconds", "40"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stop, counts = threading.Event(), {}
        side = threading.Thread(target=side_load, args=(options.target, stop, counts, minute))
        side.start()
        started = time.monotonic()
        output, _ = bids.communicate()
        watchers.wait()
        stop.set()
        side.join()
        accepted = re.search(r"accepted \(201\): (\d+)", output)
        p99 = re.search(r"p99 ([\d.]+)", output)
        if bids.returncode != 0 or "correctness: ok" not in output or "transport errors: 0" not in output:
            failed = True
            print(output)
        time.sleep(max(0.0, 60 - (time.monotonic() - started)))
        signs = vitals(options.pid, options.target)
        other = {status: count for status, count in sorted(counts.items()) if status not in (200, 201)}
        failed |= any(status >= 500 for status in other)
        print(f"| {minute} | {signs['rss_mib']} | {signs['open_files']} | {signs['threads']} | {signs['connections']} "
              f"| {signs['live_auctions']} | {accepted.group(1) if accepted else '?'} | {p99.group(1) if p99 else '?'} "
              f"| {other or '-'} |", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
