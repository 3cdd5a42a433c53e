"""An independent Kafka client for fleetpipe's tests (confluent-kafka, librdkafka 2.16).

    kafka_client.py create BROKERS TOPIC PARTITIONS
    kafka_client.py produce BROKERS TOPIC FILE       # one record per line; key = the line's vehicle_id
    kafka_client.py produce-raw BROKERS TOPIC KEY FILE  # the whole file as one record
    kafka_client.py consume BROKERS TOPIC COUNT SECS # prints COUNT records as JSON lines, then exits
    kafka_client.py committed BROKERS GROUP TOPIC    # prints {"partition": committed offset, ...}

With KAFKA_TLS_CA=ca.pem in the environment every client connects over TLS.
"""
import json
import os
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def conn(brokers):
    """The connection settings: TLS with the CA in $KAFKA_TLS_CA when it is set."""
    c = {"bootstrap.servers": brokers}
    if os.environ.get("KAFKA_TLS_CA"):
        c.update({"security.protocol": "ssl", "ssl.ca.location": os.environ["KAFKA_TLS_CA"]})
    return c


def create(brokers, topic, partitions):
    admin = AdminClient(conn(brokers))
    for _, f in admin.create_topics([NewTopic(topic, num_partitions=int(partitions), replication_factor=1)]).items():
        f.result()


def produce(brokers, topic, path):
    p = Producer({**conn(brokers), "enable.idempotence": True, "linger.ms": 5})
    failed = []
    n = 0
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\n")
            if not line:
                continue
            try:
                key = json.loads(line).get("vehicle_id")
            except Exception:
                key = None
            while True:
                try:
                    p.produce(topic, key=key, value=line,
                              on_delivery=lambda err, _m: err and failed.append(str(err)))
                    break
                except BufferError:
                    p.poll(0.1)
            n += 1
    if p.flush(60) != 0 or failed:
        sys.exit(f"not delivered: {failed[:3]}")
    print(n)


def produce_raw(brokers, topic, key, path, traceparent=None):
    p = Producer({**conn(brokers), "enable.idempotence": True})
    failed = []
    headers = [("traceparent", traceparent.encode())] if traceparent else None
    with open(path, "rb") as f:
        p.produce(topic, key=key, value=f.read(), headers=headers,
                  on_delivery=lambda err, _m: err and failed.append(str(err)))
    if p.flush(60) != 0 or failed:
        sys.exit(f"not delivered: {failed}")


def consume(brokers, topic, count, secs):
    c = Consumer({**conn(brokers), "group.id": f"test-reader-{uuid.uuid4()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    out, deadline = [], time.time() + float(secs)
    while len(out) < int(count) and time.time() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            continue
        out.append({
            "key": m.key().decode() if m.key() is not None else None,
            "value": m.value().decode(errors="replace"),
            "headers": {k: v.decode(errors="replace") for k, v in (m.headers() or [])},
            "partition": m.partition(),
            "offset": m.offset(),
        })
    c.close()
    for r in out:
        print(json.dumps(r))


def partitions_of(c, topic):
    md = c.list_topics(topic, timeout=10)
    return sorted(md.topics[topic].partitions)


def committed(brokers, group, topic):
    c = Consumer({**conn(brokers), "group.id": group, "enable.auto.commit": False})
    tps = [TopicPartition(topic, p) for p in partitions_of(c, topic)]
    res = c.committed(tps, timeout=10)
    print(json.dumps({str(tp.partition): tp.offset for tp in res}))
    c.close()


if __name__ == "__main__":
    try:
        {"create": create, "produce": produce, "produce-raw": produce_raw, "consume": consume,
         "committed": committed}[sys.argv[1]](*sys.argv[2:])
    except KafkaException as e:
        sys.exit(f"kafka: {e}")
