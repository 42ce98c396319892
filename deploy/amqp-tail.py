#!/usr/bin/env python3
"""Prints the ferry notifications on a durable demo queue bound to an exchange.

usage: amqp-tail.py URL EXCHANGE QUEUE [--declare-only] [--seconds N]
"""
import json
import sys
import time

import pika

url, exchange, queue = sys.argv[1:4]
seconds = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 5.0
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
ch.queue_declare(queue=queue, durable=True)
ch.queue_bind(queue=queue, exchange=exchange, routing_key="#")
if "--declare-only" in sys.argv:
    sys.exit(0)
deadline = time.time() + seconds
while time.time() < deadline:
    method, props, body = ch.basic_get(queue=queue, auto_ack=True)
    if method is None:
        time.sleep(0.2)
        continue
    msg = json.loads(body)
    print(f"AMQP message_id={props.message_id} routing_key={method.routing_key} "
          f"key={msg['bucket']}/{msg['key']} size={msg['size']} sha256={msg['sha256'][:16]}...")
conn.close()
