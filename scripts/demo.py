"""The end-to-end demo (``make demo``): a real local Kafka, a real worker, three real
webhook receivers that verify every signature; the example declarations published;
each one shown delivered, signed, with its trail. Everything it starts, it stops.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import localkafka  # noqa: E402

WORK = ROOT / "var" / "demo"
DEVELOPERS = {
    "acme-ai": ["train-ai", "train-genai", "data-mining"],
    "brushstroke-labs": ["train-genai", "ai-inference", "prompt-name"],
    "canvas-research": ["train-ai", "train-genai", "data-mining", "ai-inference", "prompt-name"],
}


def say(msg: str) -> None:
    """Narrate a step."""
    print(f"\n\033[1m==> {msg}\033[0m", flush=True)


def main() -> int:
    """Run the demo; return the exit code."""
    if WORK.exists():
        shutil.rmtree(WORK)
    (WORK / "connectors").mkdir(parents=True)
    procs: list[subprocess.Popen[bytes]] = []
    node = None
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTICE_RELAY_")}
    try:
        say("Starting a local Apache Kafka (KRaft, one node on 127.0.0.1)")
        t0 = time.monotonic()
        node = localkafka.start(WORK / "kafka")
        print(f"Kafka ready at {node.bootstrap} in {time.monotonic() - t0:.1f}s")

        say("Starting three webhook receivers (they verify Standard Webhooks signatures)")
        ports: dict[str, int] = {}
        for dev, accepts in DEVELOPERS.items():
            var = "WHSEC_" + dev.upper().replace("-", "_")
            env[var] = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
            ports[dev] = localkafka.free_port()
            (WORK / "connectors" / f"{dev}.toml").write_text(
                f'id = "{dev}"\nname = "{dev} (demo)"\naccepts = {json.dumps(accepts)}\n'
                f'ack_sla = "30d"\n\n[[channel]]\ntype = "webhook"\n'
                f'url = "http://127.0.0.1:{ports[dev]}/notices"\nsecret_env = "{var}"\n'
                f'timeout = "5s"\nallow_http = true\nallow_private = true\n',
                encoding="utf-8",
            )
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": node.bootstrap,
            "NOTICE_RELAY_CONNECTORS": str(WORK / "connectors"),
            "NOTICE_RELAY_PUBLISHERS": str(ROOT / "publishers.toml"),
            "NOTICE_RELAY_DATABASE_URL": f"sqlite+aiosqlite:///{WORK / 'audit.db'}",
            "NOTICE_RELAY_DATA_DIR": str(WORK / "faust"),
            "NOTICE_RELAY_APP_ID": "notice-relay-demo",
            "NOTICE_RELAY_LOG_FORMAT": "json",
        })
        cli = [sys.executable, "-m", "notice_relay"]
        for dev in DEVELOPERS:
            var = "WHSEC_" + dev.upper().replace("-", "_")
            log = (WORK / f"receiver-{dev}.log").open("wb")
            procs.append(subprocess.Popen(
                [*cli, "receiver", "--port", str(ports[dev]), "--secret-env", var,
                 "--record", str(WORK / f"received-{dev}.jsonl")],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            print(f"{dev:18} http://127.0.0.1:{ports[dev]}/notices")

        say("Checking the connectors")
        subprocess.run([*cli, "connectors", "check"], env=env, check=True)

        say("Starting the worker (normalize → fan-out → deliver → audit)")
        wlog = (WORK / "worker.log").open("wb")
        worker = subprocess.Popen([*cli, "worker"], env=env, stdout=wlog,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(worker)

        examples = sorted((ROOT / "schemas" / "examples" / "valid").glob("*.json"))
        say(f"Publishing {len(examples)} example declarations")
        subprocess.run([*cli, "publish", *map(str, examples)], env=env, check=True)
        invalid = sorted((ROOT / "schemas" / "examples" / "invalid").glob("*.json"))[:1]
        if invalid:
            say(f"Validating an invalid one ({invalid[0].name}): it is refused, with reasons")
            subprocess.run([*cli, "validate", str(invalid[0])], env=env, check=False)
            subprocess.run([*cli, "publish", "--no-validate", str(invalid[0])], env=env, check=True)

        say("Waiting for every delivery to be delivered and audited")
        ids = [json.loads(p.read_text())["declaration_id"] for p in examples]
        deadline = time.monotonic() + 120
        pending: list[str] = ids
        while time.monotonic() < deadline and pending:
            if worker.poll() is not None:
                print((WORK / "worker.log").read_text()[-4000:])
                print("the worker stopped unexpectedly")
                return 1
            pending = [i for i in ids if not _settled(cli, env, i)]
            time.sleep(1)
        if pending:
            print(f"not settled in time: {pending}")
            return 1

        for i in ids:
            say(f"Declaration {i}")
            subprocess.run([*cli, "status", i], env=env, check=True)

        say("What the receivers got")
        for dev in DEVELOPERS:
            lines = [json.loads(x) for x in
                     (WORK / f"received-{dev}.jsonl").read_text().splitlines() if x] \
                if (WORK / f"received-{dev}.jsonl").exists() else []
            ok = sum(1 for x in lines if x["verified"])
            print(f"{dev:18} {len(lines):3} notice(s) received, {ok} signature(s) verified"
                  f" by the Standard Webhooks reference library")
            if ok != len(lines):
                return 1
        say("Demo complete")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        if node is not None:
            localkafka.stop(node)


def _settled(cli: list[str], env: dict[str, str], declaration_id: str) -> bool:
    res = subprocess.run([*cli, "status", declaration_id, "--json"], env=env,
                         capture_output=True, check=False)
    if res.returncode != 0:
        return False
    data: Any = json.loads(res.stdout)
    dels = [d for x in data["declarations"] for d in x["deliveries"]]
    return bool(dels) and all(d["state"] in ("delivered", "acknowledged", "skipped") for d in dels)


if __name__ == "__main__":
    raise SystemExit(main())
