#!/usr/bin/env python3
"""An independent MQTT client for fleetpipe's gateway tests (Eclipse Paho, MQTT 3.1.1 or 5).

  mqtt_client.py publish --port P [--user U --password T] --file frames.ndjson [--v5]
      [--client-id ID] [--persistent] [--inflight N] [--acked FILE] [--timeout S] [--pad BYTES]
    Publishes every line of FILE at QoS 1 to vehicles/{vehicle_id}/{kind}, --inflight at a
    time, reconnecting (and resending what was not acknowledged) whenever the connection drops.
    Appends the line number of every PUBACKed message to --acked as the PUBACK arrives. Prints
    one JSON line: sent, acked, reason codes seen, and the session_present flag of every CONNACK.

  mqtt_client.py connect --port P [--user U --password T] [--v5] [--client-id ID]
      [--subscribe FILTER] [--publish TOPIC PAYLOAD]
    One connection: prints the CONNACK's code, then the SUBACK's or PUBACK's, as JSON.
"""
import argparse
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def make_client(args, client_id):
    protocol = mqtt.MQTTv5 if args.v5 else mqtt.MQTTv311
    kwargs = {"callback_api_version": CallbackAPIVersion.VERSION2, "client_id": client_id, "protocol": protocol}
    if not args.v5:
        kwargs["clean_session"] = not getattr(args, "persistent", False)
    c = mqtt.Client(**kwargs)
    if args.user is not None:
        c.username_pw_set(args.user, args.password)
    if args.cafile:
        c.tls_set(ca_certs=args.cafile, certfile=args.cert, keyfile=args.key)
    return c


def connect_kwargs(args):
    if not args.v5:
        return {}
    props = Properties(PacketTypes.CONNECT)
    if getattr(args, "persistent", False):
        props.SessionExpiryInterval = 3600
    return {"clean_start": not getattr(args, "persistent", False), "properties": props}


def publish(args):
    lines = [l for l in open(args.file) if l.strip()]
    frames = [json.loads(l) for l in lines]
    pad = " " * args.pad
    c = make_client(args, args.client_id or f"paho-{time.time_ns()}")
    c.max_inflight_messages_set(args.inflight)
    c.max_queued_messages_set(0)
    c.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
    state = {"acked": 0, "codes": {}, "session_present": [], "connects": 0}
    # Never held while calling into paho (its network thread calls on_publish under its own
    # lock): only around these dicts. An ack may arrive before its mid is recorded: `early`.
    lock = threading.Lock()
    mids = {}
    early = {}
    acked_out = open(args.acked, "a") if args.acked else None

    def count_ack(i, code):
        state["codes"][str(code)] = state["codes"].get(str(code), 0) + 1
        state["acked"] += 1
        if acked_out:
            acked_out.write(f"{i}\n")
            acked_out.flush()

    def on_connect(client, userdata, flags, reason_code, properties):
        with lock:
            state["connects"] += 1
            state["session_present"].append(bool(flags.session_present))

    def on_publish(client, userdata, mid, reason_code, properties):
        code = int(reason_code.value) if hasattr(reason_code, "value") else int(reason_code)
        with lock:
            i = mids.pop(mid, None)
            if i is None:
                early[mid] = code
            else:
                count_ack(i, code)

    c.on_connect = on_connect
    c.on_publish = on_publish
    c.connect_async("127.0.0.1", args.port, keepalive=30, **connect_kwargs(args))
    c.loop_start()
    deadline = time.time() + args.connect_timeout
    while state["connects"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    for i, (line, f) in enumerate(zip(lines, frames)):
        # Our own window: paho's queue of waiting messages is scanned on every ack, so it is
        # kept short instead of holding every line.
        while i - state["acked"] >= args.inflight and time.time() < deadline + args.timeout:
            time.sleep(0.0005)
        topic = f"vehicles/{f['vehicle_id']}/{f.get('kind', 'location')}"
        payload = line.rstrip("\n") + pad
        info = c.publish(topic, payload, qos=1)
        with lock:
            code = early.pop(info.mid, None)
            if code is None:
                mids[info.mid] = i
            else:
                count_ack(i, code)
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        with lock:
            if state["acked"] >= len(lines):
                break
        time.sleep(0.02)
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"sent": len(lines), "acked": state["acked"], "codes": state["codes"],
                      "session_present": state["session_present"]}))


def connect(args):
    c = make_client(args, args.client_id or f"paho-{time.time_ns()}")
    out = {}
    done = threading.Event()

    def code_of(rc):
        return int(rc.value) if hasattr(rc, "value") else int(rc)

    def on_connect(client, userdata, flags, reason_code, properties):
        out["connack"] = code_of(reason_code)
        out["session_present"] = bool(flags.session_present)
        if out["connack"] != 0:
            done.set()
            return
        if args.subscribe:
            client.subscribe(args.subscribe, qos=1)
        elif args.publish:
            client.publish(args.publish[0], args.publish[1], qos=1)
        else:
            done.set()

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        out["suback"] = [code_of(r) for r in reason_codes]
        done.set()

    def on_publish(client, userdata, mid, reason_code, properties):
        out["puback"] = code_of(reason_code)
        done.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        out.setdefault("disconnected", code_of(reason_code))
        done.set()

    c.on_connect, c.on_subscribe, c.on_publish, c.on_disconnect = on_connect, on_subscribe, on_publish, on_disconnect
    try:
        c.connect("127.0.0.1", args.port, keepalive=30, **connect_kwargs(args))
    except Exception as e:  # refused at the TCP or TLS level
        print(json.dumps({"error": str(e)}))
        return
    c.loop_start()
    done.wait(args.timeout)
    c.disconnect()
    c.loop_stop()
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("publish", "connect"):
        s = sub.add_parser(name)
        s.add_argument("--port", type=int, required=True)
        s.add_argument("--user")
        s.add_argument("--password")
        s.add_argument("--client-id")
        s.add_argument("--v5", action="store_true")
        s.add_argument("--persistent", action="store_true")
        s.add_argument("--timeout", type=float, default=60)
        s.add_argument("--cafile")
        s.add_argument("--cert")
        s.add_argument("--key")
    pub = sub.choices["publish"]
    pub.add_argument("--file", required=True)
    pub.add_argument("--inflight", type=int, default=100)
    pub.add_argument("--acked")
    pub.add_argument("--pad", type=int, default=0)
    pub.add_argument("--connect-timeout", type=float, default=30)
    con = sub.choices["connect"]
    con.add_argument("--subscribe")
    con.add_argument("--publish", nargs=2)
    args = p.parse_args()
    {"publish": publish, "connect": connect}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
