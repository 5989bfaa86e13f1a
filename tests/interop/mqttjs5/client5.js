// MQTT.js with MQTT 5.0 (protocolVersion 5) against mqttd, driven by tests/interop/test_mqttjs_v5.py.
//
//   node client5.js URL OPTIONS_JSON
//
// Connects to URL with the MQTT.js options in OPTIONS_JSON (protocolVersion 5 and no
// reconnection unless given) and then reads one JSON command per line on stdin:
//   {"op":"subscribe","topics":{FILTER:{"qos":1,"nl":true,"rap":true,"rh":0}},"options":{...}}
//   {"op":"publish","topic":T,"payload":"text","options":{"qos":1,"properties":{...}}}
//   {"op":"release"}          acknowledge held messages and stop holding (see holdAcks)
//   {"op":"end","options":{"reasonCode":0,"properties":{...}}}
// It writes one JSON event per line on stdout:
//   {"event":"connack","reasonCode":0,"sessionPresent":false,"properties":{...}}
//   {"event":"suback","error":null,"granted":[1,135]}
//   {"event":"puback","id":N,"error":null,"reasonCode":16}    (id: the publish command's)
//   {"event":"ack","cmd":"puback","messageId":1,"reasonCode":16} (each PUBACK/PUBREC received)
//   {"event":"sent","topic":"","properties":{"topicAlias":1}}  (each PUBLISH as written)
//   {"event":"message","topic":T,"wireTopic":"","payload":"text","qos":1,"retain":false,
//    "properties":{...}}                                       (topic: resolved alias)
//   {"event":"held","topic":T,"payload":"text"}               (holdAcks: not acknowledged yet)
//   {"event":"disconnect","reasonCode":142,"properties":{...}} (the server's DISCONNECT)
//   {"event":"error","message":"...","code":134}, {"event":"close"}, {"event":"ended"}
// Binary properties (correlationData, authenticationData) are hex strings both ways.
// OPTIONS_JSON may also hold "holdAcks": true: QoS 1/2 messages are not acknowledged (nor
// reported as "message") until the "release" command.
"use strict";
const path = require("path");
const readline = require("readline");

// MQTT.js is installed once, for tests/security/test_websocket.py, in tests/security/mqttjs
const mqtt = require(
  require.resolve("mqtt", { paths: [path.join(__dirname, "..", "..", "security", "mqttjs")] }),
);

const BINARY = ["correlationData", "authenticationData"];
const emit = (obj) =>
  process.stdout.write(
    JSON.stringify(obj, (key, value) =>
      value && value.type === "Buffer" && Array.isArray(value.data)
        ? Buffer.from(value.data).toString("hex")
        : value,
    ) + "\n",
  );
const fail = (what, err) => {
  process.stderr.write(`mqtt.js: ${what}: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
};
// never outlive the test, even if it forgets to kill us
setTimeout(() => fail("timeout", "no end within 30 s"), 30000).unref();

function withBinary(properties) {
  if (!properties) return properties;
  const out = { ...properties };
  for (const key of BINARY) {
    if (typeof out[key] === "string") out[key] = Buffer.from(out[key], "hex");
  }
  return out;
}

const [url, optionsJson] = process.argv.slice(2);
const { holdAcks, ...given } = JSON.parse(optionsJson || "{}");
const options = {
  protocolVersion: 5,
  reconnectPeriod: 0,
  connectTimeout: 10000,
  ...given,
  properties: withBinary(given.properties),
};
if (options.will) options.will.properties = withBinary(options.will.properties);
let held = holdAcks ? [] : null;
if (holdAcks) {
  options.customHandleAcks = (topic, message, packet, done) => {
    if (held === null) return done(0);
    held.push(done);
    emit({ event: "held", topic, payload: message.toString() });
  };
}

const client = mqtt.connect(url, options);
client.on("connect", (connack) =>
  emit({
    event: "connack",
    reasonCode: connack.reasonCode,
    sessionPresent: connack.sessionPresent,
    properties: connack.properties || {},
  }),
);
client.on("error", (err) => emit({ event: "error", message: err.message, code: err.code }));
client.on("disconnect", (packet) =>
  emit({ event: "disconnect", reasonCode: packet.reasonCode, properties: packet.properties || {} }),
);
client.on("close", () => emit({ event: "close" }));
client.on("packetsend", (packet) => {
  if (packet.cmd === "publish") {
    emit({ event: "sent", topic: packet.topic, properties: packet.properties || {} });
  }
});
client.on("packetreceive", (packet) => {
  if (packet.cmd === "puback" || packet.cmd === "pubrec") {
    emit({ event: "ack", cmd: packet.cmd, messageId: packet.messageId, reasonCode: packet.reasonCode ?? 0 });
  }
});
client.on("message", (topic, payload, packet) =>
  emit({
    event: "message",
    topic,
    wireTopic: packet.topic,
    payload: payload.toString(),
    qos: packet.qos,
    retain: packet.retain,
    properties: packet.properties || {},
  }),
);

function run(cmd) {
  switch (cmd.op) {
    case "subscribe": {
      const opts = { ...(cmd.options || {}) };
      // the SUBACK's reason codes (on an error MQTT.js leaves them only in the packet)
      client.subscribe(cmd.topics, opts, (err, granted, suback) =>
        emit({
          event: "suback",
          error: err ? err.message : null,
          granted: suback ? suback.granted : (granted || []).map((g) => g.qos),
        }),
      );
      break;
    }
    case "publish": {
      const opts = { ...(cmd.options || {}) };
      opts.properties = withBinary(opts.properties);
      client.publish(cmd.topic, cmd.payload, opts, (err, packet) =>
        emit({
          event: "puback",
          id: cmd.id,
          error: err ? err.message : null,
          reasonCode: (err ? err.code : packet && packet.reasonCode) ?? null,
        }),
      );
      break;
    }
    case "release": {
      const pending = held || [];
      held = null;
      for (const done of pending) done(0);
      break;
    }
    case "end":
      client.end(false, cmd.options || {}, () => {
        emit({ event: "ended" });
        process.exit(0);
      });
      break;
    default:
      fail("command", `unknown op ${cmd.op}`);
  }
}

readline
  .createInterface({ input: process.stdin })
  .on("line", (line) => {
    if (line.trim()) run(JSON.parse(line));
  })
  .on("close", () => process.exit(0));
