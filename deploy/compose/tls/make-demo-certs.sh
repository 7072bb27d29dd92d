#!/usr/bin/env bash
# Makes the DEMO certificates of docker-compose.yml: a CA, one certificate the three nodes
# share (naming node-a, node-b, node-c and localhost; used to serve and to call peers), and
# the agent's client certificate. Demo only: the keys are in the repository for everyone to
# read. For a real cluster, give each node its own key and certificate (docs/security.md).
#   deploy/compose/tls/make-demo-certs.sh     (needs openssl)
set -euo pipefail
cd "$(dirname "$0")"
days=3650
openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out ca-key.pem
openssl req -x509 -new -key ca-key.pem -sha256 -days "$days" -subj "/CN=modelcache demo CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.pem
issue() {
    local name=$1 san=$2
    openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$name-key.pem"
    openssl req -new -key "$name-key.pem" -subj "/CN=$name" -out "$name.csr"
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n' "$san" > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -sha256 \
        -days "$days" -extfile "$name.ext" -out "$name.pem"
    rm -f "$name.csr" "$name.ext"
}
issue node "DNS:node-a,DNS:node-b,DNS:node-c,DNS:localhost,IP:127.0.0.1"
issue agent "DNS:agent"
# The CA key is not kept: nothing else is ever signed with it.
rm -f ca.srl ca-key.pem
chmod 644 ./*.pem
