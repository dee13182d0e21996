// A @grpc/grpc-js client of the eventbus v2 contract, loaded from protos/eventbus/v2/eventbus.proto
// at run time.
// Usage: node client_v2.js ADDRESS QUEUE
// Publishes a batch to QUEUE (one message carries every byte value and attributes), receives it
// on a StreamingPull, acks it on the stream, half-closes; then checks on a second stream that
// nothing comes back, and that a refused batch is INVALID_ARGUMENT. Prints what it saw as JSON.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, queue] = process.argv.slice(2);
const definition = protoLoader.loadSync(
  path.join(__dirname, "..", "..", "protos", "eventbus", "v2", "eventbus.proto"),
  { keepCase: true, longs: String, defaults: true },
);
const v2 = grpc.loadPackageDefinition(definition).eventbus.v2;
const publisher = new v2.Publisher(address, grpc.credentials.createInsecure());
const subscriber = new v2.Subscriber(address, grpc.credentials.createInsecure());
const ALL_BYTES = Buffer.from([...Array(256).keys()]);

function deadline(ms) {
  return { deadline: new Date(Date.now() + ms) };
}

function publish(messages) {
  return new Promise((resolve, reject) => {
    publisher.Publish({ messages }, deadline(10000), (error, reply) =>
      error ? reject(error) : resolve(reply.results),
    );
  });
}

// Receives `count` messages on a new stream, acks them on it, half-closes and waits for the end.
function pullAndAck(count) {
  return new Promise((resolve, reject) => {
    const call = subscriber.StreamingPull(deadline(10000));
    const received = [];
    const invalid = [];
    call.on("data", (response) => {
      received.push(...response.messages);
      invalid.push(...response.invalid_ack_ids);
      if (received.length === count) {
        call.write({ ack_ids: received.map((m) => m.ack_id) });
        call.end();
      }
    });
    call.on("error", reject);
    call.on("status", (status) => {
      if (status.code === grpc.status.OK) resolve({ received, invalid });
    });
    call.write({ queue, max_outstanding_messages: 10, ack_deadline_seconds: 30 });
  });
}

// What a new stream receives within `ms` (expected: nothing); then cancels it.
function quietFor(ms) {
  return new Promise((resolve) => {
    const call = subscriber.StreamingPull();
    const received = [];
    call.on("data", (response) => received.push(...response.messages));
    call.on("error", () => resolve(received));
    call.write({ queue });
    setTimeout(() => call.cancel(), ms);
  });
}

async function main() {
  const results = await publish([
    { queue, data: ALL_BYTES, attributes: { kind: "node ✓", empty: "" } },
    { queue, data: Buffer.from("second"), dedup_id: "node-once" },
    { queue, data: Buffer.from("second again"), dedup_id: "node-once" },
  ]);
  const { received, invalid } = await pullAndAck(2);
  const after = await quietFor(1000);
  let refused = null;
  try {
    await publish([{ queue, topic: queue, data: Buffer.from("x") }]);
  } catch (error) {
    refused = { code: error.code, details: error.details };
  }
  console.log(
    JSON.stringify({
      results,
      received: received.map((m) => ({
        message_id: m.message_id,
        ack_id: m.ack_id,
        data: m.data.toString("hex"),
        attributes: m.attributes,
        attempt: m.attempt,
        queue: m.queue,
        publish_time: Number(m.publish_time.seconds),
      })),
      invalid,
      after: after.length,
      refused,
    }),
  );
  publisher.close();
  subscriber.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
