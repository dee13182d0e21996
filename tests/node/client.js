// A @grpc/grpc-js client of the eventbus v1 contract, loaded from protos/mq.proto at run time.
// Usage: node client.js ADDRESS QUEUE COUNT
// Publishes COUNT messages to QUEUE, pulls and acks them, and prints what it received as JSON.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, queue, count] = process.argv.slice(2);
const definition = protoLoader.loadSync(path.join(__dirname, "..", "..", "protos", "mq.proto"), {
  keepCase: true,
  longs: String,
  defaults: true,
});
const mq = grpc.loadPackageDefinition(definition).mq;
const client = new mq.Mq(address, grpc.credentials.createInsecure());

function call(method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 10000);
    client[method](request, { deadline }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

async function main() {
  const received = [];
  for (let i = 0; i < Number(count); i++) {
    await call("publish", { queue, data: `node ${i} ✓`, ExpirationSeconds: 0 });
  }
  for (let i = 0; i < Number(count); i++) {
    const reply = await call("subscribe", { queue });
    await call("ack", { id: reply.id });
    received.push({ id: reply.id, data: reply.data, queue: reply.queue });
  }
  let invalid = null;
  try {
    await call("publish", { queue: "", data: "x" });
  } catch (error) {
    invalid = error.code;
  }
  console.log(JSON.stringify({ received, invalid }));
  client.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
