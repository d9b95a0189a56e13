#!/bin/sh
# One-shot job (hashicorp/vault image) for the compose stack's dev-mode Vault: writes the same demo world
# as devstack/seed.json (the Amazon app, tenant `acme` connected to Amazon, tenant `bistro` not) and an
# AppRole `outbound-worker` that may only read those secrets, with the role id / secret id the worker is
# given. Dev-mode Vault keeps everything in memory: this runs again each time the stack starts.
# Safe to run twice. It ends by logging in as the worker would and reading a tenant secret, so a
# policy that does not let the worker read fails here, not at the first delivery.
set -eu

: "${VAULT_ADDR:?VAULT_ADDR is required}"
: "${VAULT_TOKEN:?VAULT_TOKEN (a token allowed to write secrets, policies and auth) is required}"
: "${OUTBOUND_VAULT_ROLE_ID:?OUTBOUND_VAULT_ROLE_ID (the role id the worker logs in with) is required}"
: "${OUTBOUND_VAULT_SECRET_ID:?OUTBOUND_VAULT_SECRET_ID (the secret id the worker logs in with) is required}"
KV_MOUNT="${OUTBOUND_VAULT_KV_MOUNT:-secret}"
ROLE=outbound-worker

echo "seeding Vault at $VAULT_ADDR (KV v2 mount $KV_MOUNT)"

# The Amazon SP-API application (one per deployment) and the tenants' seller authorisations.
vault kv put -mount="$KV_MOUNT" keybuzz/amazon_spapi/app \
    client_id="amzn1.application-oa2-client.demo" \
    client_secret="demo-client-secret" \
    application_id="amzn1.sp.solution.demo" \
    region="eu"
vault kv put -mount="$KV_MOUNT" keybuzz/tenants/acme/amazon_spapi \
    refresh_token="Atzr|demo-refresh-token-acme" \
    seller_id="A2DEMOSELLERACME" \
    marketplace_id="A13V1IB3VIYZZH" \
    region="eu"

# The worker's identity: read-only on the delivery secrets, nothing else.
vault policy write "$ROLE" - <<POLICY
path "$KV_MOUNT/data/keybuzz/*" {
  capabilities = ["read"]
}
POLICY
if ! vault auth enable approle >/dev/null 2>&1; then
    vault auth list | grep -q '^approle/' || { echo "could not enable the approle auth method" >&2; exit 1; }
fi
vault write "auth/approle/role/$ROLE" token_policies="$ROLE" token_ttl=1h token_max_ttl=4h \
    secret_id_ttl=0 secret_id_num_uses=0
vault write "auth/approle/role/$ROLE/role-id" role_id="$OUTBOUND_VAULT_ROLE_ID"
# A second run finds the secret id registered already; the login below is the check either way.
vault write "auth/approle/role/$ROLE/custom-secret-id" secret_id="$OUTBOUND_VAULT_SECRET_ID" >/dev/null 2>&1 \
    || echo "secret id of $ROLE already registered"

worker_token=$(vault write -field=token auth/approle/login \
    role_id="$OUTBOUND_VAULT_ROLE_ID" secret_id="$OUTBOUND_VAULT_SECRET_ID")
seller=$(VAULT_TOKEN="$worker_token" vault kv get -mount="$KV_MOUNT" -field=seller_id keybuzz/tenants/acme/amazon_spapi)
echo "AppRole $ROLE logs in and reads tenant acme (seller $seller): Vault is ready for the worker"
