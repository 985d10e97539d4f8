'use strict';
// Node client of fmapi's public gRPC API (fmapi.inference.v1).
//
// The protos are loaded at run time with @grpc/proto-loader from ./proto (copied there by
// `make gen`, with the google.rpc error protos). Messages are plain objects:
//   keepCase  field names as in the proto (tool_calls, prompt_tokens)
//   longs     String: int64 fields (RateLimit.calls, ...) come back as decimal strings
//   enums     String: enum fields come back as their names ('EMBEDDING_ENCODING_BYTES')
//   defaults  absent scalars come back as their defaults, absent messages as null
//   oneofs    a oneof's name holds the name of the field that is set (ToolChoice.choice)
// Requests accept numbers or strings for int64 fields and names or numbers for enums.

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_DIR = path.join(__dirname, 'proto');
const INFERENCE_PROTO = 'fmapi/inference/v1/inference.proto';
const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

if (!fs.existsSync(path.join(PROTO_DIR, INFERENCE_PROTO))) {
  throw new Error(`${path.join(PROTO_DIR, INFERENCE_PROTO)} is missing: run \`make gen\` ` +
    '(or `make install`) at the root of the fmapi repository');
}

const packageDefinition = protoLoader.loadSync(INFERENCE_PROTO, LOADER_OPTIONS);
const proto = grpc.loadPackageDefinition(packageDefinition);
const InferenceService = proto.fmapi.inference.v1.InferenceService;

function authMetadata(token) {
  const md = new grpc.Metadata();
  md.set('authorization', `Bearer ${token}`);
  return md;
}

// Adds the token to every call, unless the caller set its own authorization metadata.
function authInterceptor(token) {
  return (options, nextCall) => new grpc.InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      if (metadata.get('authorization').length === 0) {
        metadata.set('authorization', `Bearer ${token}`);
      }
      next(metadata, listener);
    },
  });
}

/**
 * An InferenceService client of `target` (host:port) whose every call sends
 * `authorization: Bearer <token>`. Plaintext (h2c) unless `secure`; grpc-js refuses call
 * credentials on an insecure channel, so there the token goes in through an interceptor.
 */
function createClient(target, { token, secure = false, rootCerts, channelOptions } = {}) {
  const options = { ...(channelOptions || {}) };
  let credentials;
  if (secure) {
    credentials = grpc.credentials.createSsl(rootCerts || null);
    if (token) {
      credentials = grpc.credentials.combineChannelCredentials(
        credentials,
        grpc.credentials.createFromMetadataGenerator((_params, cb) => cb(null, authMetadata(token))),
      );
    }
  } else {
    credentials = grpc.credentials.createInsecure();
    if (token) {
      options.interceptors = [...(options.interceptors || []), authInterceptor(token)];
    }
  }
  return new InferenceService(target, credentials, options);
}

// google.rpc.Status and its details, decoded with protobufjs from the copied protos (the
// google/protobuf well-known types they import are bundled with protobufjs).
let rpcRoot = null;
function rpc() {
  if (rpcRoot === null) {
    rpcRoot = new protobuf.Root().loadSync(
      [path.join(PROTO_DIR, 'google/rpc/status.proto'),
        path.join(PROTO_DIR, 'google/rpc/error_details.proto')],
      { keepCase: true },
    );
  }
  return rpcRoot;
}

const TO_OBJECT = { longs: Number, enums: String, bytes: Buffer, defaults: true, arrays: true, objects: true };

function seconds(duration) {
  if (!duration) return 0;
  return Number(duration.seconds || 0) + Number(duration.nanos || 0) / 1e9;
}

/**
 * The google.rpc.Status of a failed call (its grpc-status-details-bin trailer), as
 * { code, message, errorInfo?, badRequest?, retryInfo?, details }; null without the trailer.
 * `details` lists every detail whose type is a google.rpc one, as { type, value }.
 */
function errorDetails(err) {
  const md = err && err.metadata;
  if (!md || typeof md.get !== 'function') return null;
  const [bin] = md.get('grpc-status-details-bin');
  if (!bin) return null;
  const root = rpc();
  const Status = root.lookupType('google.rpc.Status');
  const status = Status.decode(typeof bin === 'string' ? Buffer.from(bin, 'base64') : bin);
  const out = { code: status.code, message: status.message, details: [] };
  for (const any of status.details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    let Type;
    try {
      Type = root.lookupType(typeName);
    } catch {
      continue; // not a google.rpc type we know
    }
    const value = Type.toObject(Type.decode(any.value), TO_OBJECT);
    out.details.push({ type: typeName, value });
    if (typeName === 'google.rpc.ErrorInfo') {
      out.errorInfo = { reason: value.reason, domain: value.domain, metadata: value.metadata };
    } else if (typeName === 'google.rpc.BadRequest') {
      out.badRequest = {
        fieldViolations: value.field_violations.map((v) => ({ field: v.field, description: v.description })),
      };
    } else if (typeName === 'google.rpc.RetryInfo') {
      out.retryInfo = { retryDelaySeconds: seconds(value.retry_delay) };
    }
  }
  return out;
}

/**
 * The x-ratelimit-* entries of a call's initial metadata (a grpc.Metadata, or a plain object):
 * numbers where the value is a number (limit, remaining), else strings (reset, e.g. "1m0s").
 */
function rateLimits(metadata) {
  const map = metadata && typeof metadata.getMap === 'function' ? metadata.getMap() : (metadata || {});
  const out = {};
  for (const [key, raw] of Object.entries(map)) {
    const name = key.toLowerCase();
    if (!name.startsWith('x-ratelimit-')) continue;
    const value = Array.isArray(raw) ? raw[0] : raw;
    const text = Buffer.isBuffer(value) ? value.toString() : String(value);
    out[name] = text.trim() !== '' && Number.isFinite(Number(text)) ? Number(text) : text;
  }
  return out;
}

module.exports = {
  createClient,
  errorDetails,
  rateLimits,
  InferenceService,
  packageDefinition,
  grpc,
  PROTO_DIR,
  LOADER_OPTIONS,
};
