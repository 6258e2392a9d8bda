// The authorization server of the introspection tests: oidc-provider on loopback, issuing
// opaque client-credentials tokens, with RFC 7662 introspection and RFC 7009 revocation.
//
// Started by tests/api/introspection.rs as `node server.mjs`; it listens on a free loopback port
// and prints one line `{"port": N}` once it accepts connections. Every client's secret is the
// value of OIDC_CLIENT_SECRET (a test-only value chosen by the test). `GET /__test/introspections`
// answers how many introspection requests were served so far, so a test can count calls.
import { createServer } from 'node:http';
import Provider from 'oidc-provider';

const SCOPES = [
  'orchestrator.register',
  'orchestrator.task',
  'orchestrator.events',
  'orchestrator.events.read',
  'orchestrator.submit',
  'orchestrator.admin.read',
  'orchestrator.admin',
];
const secret = process.env.OIDC_CLIENT_SECRET;
if (!secret || secret.length < 32) {
  console.error('OIDC_CLIENT_SECRET must be set (at least 32 characters)');
  process.exit(2);
}
const ttl = Number(process.env.OIDC_TOKEN_TTL || 3600);

// The bridge itself (introspects), agents agent-1 … agent-9, two operators, and one service
// client whose tokens name their agent in an `agent_id` member instead of the client id.
const clientIds = ['auto-com-center', 'operator', 'reader', 'svc-x'];
for (let i = 1; i <= 9; i += 1) clientIds.push(`agent-${i}`);
const clients = clientIds.map((client_id) => ({
  client_id,
  client_secret: secret,
  grant_types: ['client_credentials'],
  redirect_uris: [],
  response_types: [],
  token_endpoint_auth_method: 'client_secret_basic',
  scope: SCOPES.join(' '),
}));

// Resource indicators: the default one stands for this service (audience `auto-com-center`);
// `urn:other:api` stands for another service, to test a token meant for someone else.
const RESOURCES = {
  'urn:acc:api': 'auto-com-center',
  'urn:other:api': 'other-service',
};

let introspections = 0;

const provider = new Provider('http://127.0.0.1', {
  clients,
  scopes: SCOPES,
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: {
      enabled: true,
      // Any authenticated client may revoke a token: the test revokes agents' tokens as the bridge.
      allowedPolicy: async () => true,
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (_ctx, _client, oneOf) => oneOf || 'urn:acc:api',
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, resource) => {
        const audience = RESOURCES[resource];
        if (!audience) throw new Error('unknown resource');
        return {
          scope: SCOPES.join(' '),
          audience,
          accessTokenFormat: 'opaque',
          accessTokenTTL: ttl,
        };
      },
    },
  },
  extraTokenClaims: async (_ctx, token) => (token.clientId === 'svc-x' ? { agent_id: 'agent-x' } : undefined),
});
provider.proxy = false;

provider.use(async (ctx, next) => {
  if (ctx.path === '/__test/introspections') {
    ctx.body = { count: introspections };
    return;
  }
  if (ctx.path === '/token/introspection') introspections += 1;
  await next();
});

const server = createServer(provider.callback());
server.listen(Number(process.env.OIDC_PORT || 0), '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ port: server.address().port })}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
