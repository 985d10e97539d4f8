'use strict';
// The Node client against a running fmapi, through Envoy (plaintext h2c). Configured by:
//   FMAPI_GRPC_TARGET       host:port of Envoy
//   FMAPI_TOKEN             an admin token
//   FMAPI_EMBED_ENDPOINT    an embeddings endpoint (all-minilm-l6-v2: 384 dimensions)
//   FMAPI_CHAT_ENDPOINT     a chat endpoint (a tiny random-weight model: its text is gibberish,
//                           so only the structure of its output is checked)
//   FMAPI_LIMITED_ENDPOINT  an embeddings endpoint allowing 1 request per minute, all together
// tests/e2e/test_node_client_e2e.py starts the system and runs this file.

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { createClient, errorDetails, rateLimits, grpc } = require('..');

function env(name) {
  const value = process.env[name];
  assert.ok(value, `${name} is not set (see the top of ${__filename})`);
  return value;
}

const TARGET = env('FMAPI_GRPC_TARGET');
const TOKEN = env('FMAPI_TOKEN');
const EMBED = env('FMAPI_EMBED_ENDPOINT');
const CHAT = env('FMAPI_CHAT_ENDPOINT');
const LIMITED = env('FMAPI_LIMITED_ENDPOINT');
const DIMENSIONS = 384;

const client = createClient(TARGET, { token: TOKEN });
const anonymous = createClient(TARGET);
after(() => {
  client.close();
  anonymous.close();
});

const deadline = (seconds) => ({ deadline: Date.now() + seconds * 1000 });

// A unary call as a promise of { response, metadata } (metadata: the initial metadata).
function unary(c, method, request, seconds = 30) {
  return new Promise((resolve, reject) => {
    let metadata = null;
    const call = c[method](request, deadline(seconds), (err, response) => {
      if (err) reject(err);
      else resolve({ response, metadata });
    });
    call.on('metadata', (md) => { metadata = md; });
  });
}

// Every message of a server stream, or the stream's error.
function collect(stream) {
  return new Promise((resolve, reject) => {
    const out = [];
    stream.on('data', (m) => out.push(m));
    stream.on('error', reject);
    stream.on('end', () => resolve(out));
  });
}

// The error a call fails with (the test fails when it succeeds).
async function failure(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail('the call succeeded');
}

const statusName = (code) => Object.keys(grpc.status).find((k) => grpc.status[k] === code) || code;

function assertStatus(err, code) {
  assert.equal(statusName(err.code), statusName(code), `unexpected status: ${err.message}`);
}

test('ListModels lists the endpoints; GetModel shows the rate limit', async () => {
  const { response } = await unary(client, 'ListModels', {});
  const tasks = Object.fromEntries(response.models.map((m) => [m.id, m.task]));
  assert.equal(tasks[EMBED], 'llm/v1/embeddings');
  assert.equal(tasks[CHAT], 'llm/v1/chat');

  const { response: got } = await unary(client, 'GetModel', { endpoint: LIMITED });
  assert.equal(got.model.id, LIMITED);
  assert.equal(got.model.task, 'llm/v1/embeddings');
  const limit = got.model.rate_limits.find((r) => r.key === 'endpoint');
  assert.ok(limit, `no endpoint rate limit in ${JSON.stringify(got.model.rate_limits)}`);
  assert.equal(Number(limit.calls), 1); // int64: a string (longs: String)
});

test('Embed returns one vector per text, as floats or little-endian bytes', async () => {
  const texts = ['the Node client', 'through Envoy'];
  const { response } = await unary(client, 'Embed', { endpoint: EMBED, texts });
  assert.equal(response.embeddings.length, 2);
  const [a, b] = response.embeddings.map((e) => e.values);
  assert.equal(a.length, DIMENSIONS);
  assert.equal(b.length, a.length);
  assert.ok(response.usage.prompt_tokens > 0, JSON.stringify(response.usage));

  const { response: raw } = await unary(client, 'Embed', {
    endpoint: EMBED, texts, encoding: 'EMBEDDING_ENCODING_BYTES',
  });
  assert.equal(raw.embeddings.length, 2);
  raw.embeddings.forEach((e, i) => {
    assert.ok(Buffer.isBuffer(e.raw));
    assert.equal(e.raw.length, 4 * DIMENSIONS);
    assert.equal(e.values.length, 0);
    const floats = Array.from({ length: DIMENSIONS }, (_, j) => e.raw.readFloatLE(4 * j));
    const want = response.embeddings[i].values;
    floats.forEach((f, j) => assert.ok(Math.abs(f - want[j]) <= 1e-6, `[${i}][${j}]: ${f} != ${want[j]}`));
  });
});

test('a streamed Chat calls the forced tool', { timeout: 150_000 }, async () => {
  const stream = client.Chat({
    endpoint: CHAT,
    messages: [{ role: 'user', content: 'What is the weather in Paris?' }],
    tools: [{
      type: 'function',
      function: {
        name: 'get_weather',
        description: 'The current weather in a city.',
        // maxLength: a random-weight model never ends a free string by itself (guided
        // decoding closes it at the bound, as the generation service's own tests do).
        parameters_json: JSON.stringify({
          type: 'object',
          properties: { city: { type: 'string', maxLength: 12 } },
          required: ['city'],
          additionalProperties: false,
        }),
      },
    }],
    tool_choice: { function_name: 'get_weather' },
    sampling: { max_tokens: 64, seed: 1, temperature: 0 },
  }, deadline(120));
  const messages = await collect(stream);
  assert.ok(messages.length > 0);
  const deltas = messages.flatMap((m) => m.deltas);
  const call = deltas.find((d) => d.tool_calls.length > 0 && d.tool_calls[0].function
    && d.tool_calls[0].function.name === 'get_weather');
  assert.ok(call, `no get_weather call in ${JSON.stringify(deltas)}`);
  const args = JSON.parse(call.tool_calls[0].function.arguments);
  assert.equal(typeof args.city, 'string', call.tool_calls[0].function.arguments);
  assert.ok(deltas.some((d) => d.finish_reason === 'tool_calls'),
    `finish reasons: ${JSON.stringify(deltas.map((d) => d.finish_reason))}`);
  const last = messages[messages.length - 1];
  assert.ok(last.usage, `the last message has no usage: ${JSON.stringify(last)}`);
  assert.ok(last.usage.prompt_tokens > 0, JSON.stringify(last.usage));
});

test('a refusal over the limit says why and when to retry', async (t) => {
  let err = null;
  let admitted = null;
  for (let i = 0; i < 3 && err === null; i++) {
    try {
      ({ metadata: admitted } = await unary(client, 'Embed', { endpoint: LIMITED, texts: ['limited'] }));
    } catch (e) {
      err = e;
    }
  }
  assert.ok(err, 'three calls of a 1-request-per-minute endpoint all succeeded');
  assertStatus(err, grpc.status.RESOURCE_EXHAUSTED);
  const details = errorDetails(err);
  assert.ok(details, 'no grpc-status-details-bin trailer');
  assert.equal(details.code, grpc.status.RESOURCE_EXHAUSTED);
  assert.ok(details.errorInfo, `no ErrorInfo in ${JSON.stringify(details)}`);
  assert.equal(details.errorInfo.reason, 'REQUEST_LIMIT_EXCEEDED');
  assert.ok(details.retryInfo, `no RetryInfo in ${JSON.stringify(details)}`);
  assert.ok(details.retryInfo.retryDelaySeconds > 0, JSON.stringify(details.retryInfo));
  if (admitted) {
    // The admitted call (none when this ran twice within a minute) carried the quota left.
    const limits = rateLimits(admitted);
    t.diagnostic(`admitted call's rate limits: ${JSON.stringify(limits)}`);
    assert.equal(limits['x-ratelimit-limit-requests'], 1, JSON.stringify(limits));
    assert.equal(limits['x-ratelimit-remaining-requests'], 0, JSON.stringify(limits));
  }
});

test('a bad request names the offending field', async () => {
  const err = await failure(collect(client.Chat({
    endpoint: CHAT,
    messages: [{ role: 'user', content: 'hi' }],
    sampling: { temperature: 5 },
  }, deadline(30))));
  assertStatus(err, grpc.status.INVALID_ARGUMENT);
  const details = errorDetails(err);
  assert.ok(details && details.badRequest, `no BadRequest in ${JSON.stringify(details)}`);
  const fields = details.badRequest.fieldViolations.map((v) => v.field);
  assert.ok(fields.includes('sampling.temperature'), JSON.stringify(fields));
});

test('a call without a token is refused', async () => {
  const err = await failure(unary(anonymous, 'ListModels', {}));
  assertStatus(err, grpc.status.UNAUTHENTICATED);
  assert.ok(err.details && err.details.length > 0, `empty message: ${err.message}`);
});
