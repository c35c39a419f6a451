"""The cluster demo's client side (run by scripts/cluster-demo, which starts
the nodes): bidders through every node, a WebSocket watcher on every node, the
hot auction's owner killed with SIGKILL halfway, and a report of what each
part saw. Exits non-zero if any check fails.

    python3 scripts/cluster_demo.py --nodes node-0=http://127.0.0.1:18301=PID,... [--seconds 6]
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

import websockets


def call(base, method, path, body=None, token=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null"), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null"), dict(error.headers)


class Bidder(threading.Thread):
    """Bids just above the last price it heard of, through the live nodes in turn."""

    def __init__(self, index, token, user_id, auction_id, nodes, stop, acknowledged, killed):
        super().__init__(daemon=True)
        self.index, self.token, self.user_id, self.auction_id = index, token, user_id, auction_id
        self.nodes, self.stop, self.acknowledged, self.killed = nodes, stop, acknowledged, killed
        self.answers = {}

    def run(self):
        amount = 1_000 + self.index
        attempt = 0
        while not self.stop.is_set():
            attempt += 1
            live = [url for name, url in self.nodes if name not in self.killed]
            base = live[attempt % len(live)]
            try:
                status, body, headers = call(base, "POST", f"/api/v1/auctions/{self.auction_id}/bids",
                                             {"amount": amount}, self.token)
            except OSError:
                continue
            self.answers[status] = self.answers.get(status, 0) + 1
            if status == 201:
                self.acknowledged.append((time.monotonic(), self.user_id, amount, body))
                amount = body["current_price"] + 1 + self.index % 3
            elif status == 409 and body["error"]["code"] == "BID_TOO_LOW":
                amount = body["error"]["min_bid"] + self.index % 3
            elif status == 409:
                amount += 10
            else:
                time.sleep(0.05)


async def watch(name, url, auction_id, seen, stop):
    """Subscribes on one node and records every bid and snapshot it is sent."""
    async with websockets.connect(url.replace("http://", "ws://") + "/ws") as socket:
        await socket.send(json.dumps({"type": "subscribe", "auction_id": auction_id}))
        while not stop.is_set():
            try:
                message = json.loads(await asyncio.wait_for(socket.recv(), 0.5))
            except asyncio.TimeoutError:
                continue
            except websockets.ConnectionClosed:
                seen.append(("closed", None))
                return
            if message["type"] == "snapshot":
                seen.append(("snapshot", message["auction"]["seq"]))
            elif message["type"] == "bid":
                seen.append(("bid", message["seq"]))


def check_sequence(seen):
    """Every bid follows the last one shown by one; a snapshot may jump ahead, never back."""
    shown, bids, snapshots = None, 0, 0
    for kind, seq in seen:
        if kind == "snapshot":
            if shown is not None and seq < shown:
                return False, bids, snapshots, f"a snapshot went back to {seq} after {shown}"
            shown, snapshots = seq, snapshots + 1
        elif kind == "bid":
            if shown is None or seq != shown + 1:
                return False, bids, snapshots, f"bid {seq} after {shown}"
            shown, bids = seq, bids + 1
    return True, bids, snapshots, f"up to seq {shown}"


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", required=True, help="name=url=pid,...")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    nodes = [tuple(item.split("=")) for item in args.nodes.split(",")]
    urls = [(name, url) for name, url, _ in nodes]
    pids = {name: int(pid) for name, _, pid in nodes}
    first = urls[0][1]
    suffix = str(int(time.time() * 1000) % 1_000_000)

    def register(name):
        status, body, _ = call(first, "POST", "/api/v1/auth/register",
                               {"username": f"{name}_{suffix}", "password": "demo-password"})
        assert status == 201, body
        return body["token"], body["user"]["id"]

    seller_token, _ = register("seller")
    status, auction, _ = call(first, "POST", "/api/v1/auctions",
                              {"title": "cluster demo", "currency": "EUR", "starting_price": 1000,
                               "min_increment": 1, "duration_secs": 3600}, seller_token)
    assert status == 201, auction
    auction_id = auction["id"]
    _, where, _ = call(first, "GET", f"/api/v1/cluster/auctions/{auction_id}")
    owner = where["owner"]
    print(f"auction {auction_id}: shard {where['shard']}, owned by {owner} (epoch {where['epoch']})")

    stop_watching = asyncio.Event()
    seen = {name: [] for name, _ in urls}
    watchers = [asyncio.create_task(watch(name, url, auction_id, seen[name], stop_watching)) for name, url in urls]
    await asyncio.sleep(0.5)

    stop, killed, acknowledged = threading.Event(), set(), []
    bidders = []
    for index in range(12):
        token, user_id = register(f"bidder{index}")
        bidders.append(Bidder(index, token, user_id, auction_id, urls, stop, acknowledged, killed))
    for bidder in bidders:
        bidder.start()
    await asyncio.sleep(args.seconds / 2)

    print(f"SIGKILL {owner} (pid {pids[owner]})")
    killed.add(owner)
    killed_at = time.monotonic()
    os.kill(pids[owner], signal.SIGKILL)
    survivor = next(url for name, url in urls if name != owner)
    new_owner = None
    while time.monotonic() - killed_at < 30:
        _, where, _ = call(survivor, "GET", f"/api/v1/cluster/auctions/{auction_id}")
        if where["owner"] not in (None, owner):
            new_owner = where["owner"]
            break
        await asyncio.sleep(0.05)
    takeover = time.monotonic() - killed_at
    first_after = next((at for at, *_ in acknowledged if at > killed_at), None)
    print(f"{new_owner} took the auction over {takeover:.2f} s after the kill (epoch {where['epoch']}); "
          f"first bid accepted after the kill: "
          f"{'none' if first_after is None else f'{first_after - killed_at:.2f} s'}")
    await asyncio.sleep(args.seconds / 2)
    stop.set()
    for bidder in bidders:
        bidder.join()
    await asyncio.sleep(1.0)
    stop_watching.set()
    await asyncio.gather(*watchers)

    before = sum(1 for at, *_ in acknowledged if at <= killed_at)
    print(f"bids accepted: {before} before the kill, {len(acknowledged) - before} after "
          f"({len(acknowledged) / args.seconds:.0f}/s over the run)")
    answers = {}
    for bidder in bidders:
        for status, count in bidder.answers.items():
            answers[status] = answers.get(status, 0) + count
    print(f"answers by status: {dict(sorted(answers.items()))}")

    ok = new_owner is not None and first_after is not None
    for name, _ in urls:
        if name == owner:
            continue
        in_order, bids, snapshots, detail = check_sequence(seen[name])
        ok &= in_order
        print(f"watcher on {name}: {bids} bid events, {snapshots} snapshot(s), "
              f"{'in order, gap-free' if in_order else 'OUT OF ORDER'} ({detail})")

    history = []
    before_seq = None
    while True:
        query = "?limit=100" + (f"&before_seq={before_seq}" if before_seq else "")
        _, page, _ = call(survivor, "GET", f"/api/v1/auctions/{auction_id}/bids{query}")
        history.extend(page["items"])
        if page["next_before_seq"] is None:
            break
        before_seq = page["next_before_seq"]
    stored = {bid["seq"]: bid for bid in history}
    missing = [body["seq"] for _, user_id, amount, body in acknowledged
               if stored.get(body["seq"], {}).get("bidder", {}).get("id") != user_id
               or stored[body["seq"]]["amount"] != amount]
    seqs = [body["seq"] for *_, body in acknowledged]
    twice = len(seqs) - len(set(seqs))
    gap_free = sorted(stored) == list(range(1, len(stored) + 1))
    ok &= not missing and twice == 0 and gap_free
    print(f"store: {len(history)} bids, seq 1..{len(history)} {'without gaps' if gap_free else 'WITH GAPS'}; "
          f"every acknowledged bid stored unchanged: {'yes' if not missing else f'NO, missing {missing[:10]}'}; "
          f"seqs acknowledged twice: {twice}")
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    asyncio.run(main())
