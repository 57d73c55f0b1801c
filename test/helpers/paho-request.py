"""An independent MQTT 5 client (Eclipse Paho for Python, Debian's python3-paho-mqtt): publishes one request with a
response topic and correlation data, optionally signed the way the README shows, and prints the response.

Usage: paho-request.py HOST PORT REQUEST_JSON RESPONSE_TOPIC CORRELATION [SECRET]
"""
import hashlib
import hmac
import json
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

host, port, request_json, response_topic, correlation = sys.argv[1:6]
secret = sys.argv[6] if len(sys.argv) > 6 else None
request = json.loads(request_json)
if secret:
    request["timestamp"] = int(time.time() * 1000)
    # The canonical JSON: keys sorted at every depth, no spaces, UTF-8 with non-ASCII characters unescaped.
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    request["signature"] = hmac.new(secret.encode(), canonical.encode("utf-8"), hashlib.sha256).hexdigest()

done = {}


def on_connect(client, userdata, flags, reason_code, properties):
    client.subscribe(response_topic, qos=1)


def on_subscribe(client, userdata, mid, reason_codes, properties):
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation.encode()
    client.publish("jobs/pending", json.dumps(request, ensure_ascii=False).encode("utf-8"), qos=1, properties=props)


def on_message(client, userdata, message):
    data = getattr(message.properties, "CorrelationData", b"")
    done["response"] = {"payload": json.loads(message.payload), "correlation": data.decode()}
    client.disconnect()


client = mqtt.Client(client_id="paho-test-%d" % int(time.time() * 1000), protocol=mqtt.MQTTv5)
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect(host, int(port))
deadline = time.time() + 30
while "response" not in done and time.time() < deadline:
    client.loop(timeout=0.2)
print(json.dumps(done.get("response")))
sys.exit(0 if "response" in done else 1)
