// MQTT.js against mqttd over WebSocket, driven by tests/security/test_websocket.py.
//
//   node client.js URL CLIENT_ID SUB_FILTER COUNT PUB_TOPIC [CA_FILE]
//
// Connects with MQTT 3.1.1 (protocolVersion 4), subscribes to SUB_FILTER at QoS 1, publishes
// "from mqtt.js" to PUB_TOPIC at QoS 1, and prints one JSON line per event on stdout:
// {"event":"connected"}, {"event":"subscribed","granted":[..]}, {"event":"published"},
// {"event":"message",...} (COUNT times), then exits 0. Any error: a line on stderr, exit 1.
"use strict";
const fs = require("fs");
const mqtt = require("mqtt");

const [url, clientId, filter, count, pubTopic, caFile] = process.argv.slice(2);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const fail = (what, err) => {
  process.stderr.write(`mqtt.js: ${what}: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
};
// never outlive the test, even if it forgets to kill us
setTimeout(() => fail("timeout", "no result within 30 s"), 30000).unref();

const options = {
  protocolVersion: 4,
  clientId,
  clean: true,
  reconnectPeriod: 0,
  connectTimeout: 10000,
};
if (caFile) {
  options.ca = fs.readFileSync(caFile);
  options.rejectUnauthorized = true;
}
const client = mqtt.connect(url, options);
let remaining = Number(count);
client.on("error", (err) => fail("error", err));
client.on("close", () => {
  if (remaining > 0) fail("close", "connection closed early");
});
client.on("message", (topic, payload, packet) => {
  emit({ event: "message", topic, payload: payload.toString("hex"), qos: packet.qos });
  remaining -= 1;
  if (remaining === 0) client.end(false, () => process.exit(0));
});
client.on("connect", (connack) => {
  emit({ event: "connected", returnCode: connack.returnCode });
  client.subscribe(filter, { qos: 1 }, (err, granted) => {
    if (err) fail("subscribe", err);
    emit({ event: "subscribed", granted: granted.map((g) => g.qos) });
    client.publish(pubTopic, "from mqtt.js", { qos: 1 }, (perr) => {
      if (perr) fail("publish", perr);
      emit({ event: "published" });
    });
  });
});
