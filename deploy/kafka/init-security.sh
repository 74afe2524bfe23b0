#!/bin/bash
# Run by the compose `topic-init` job, as admin, before it creates the topics. Idempotent: safe on
# every `docker compose up` (it also rotates a password changed in .env).
#
# One SCRAM user per service, each with only what it needs:
#   worker    everything under the `echolm` prefix: the echolm.* topics, faust's echolm-__assignor-__leader
#             topic and the `echolm` consumer group (worker.app_id; change both together)
#   gateway   writes echolm.requests and echolm.feedback, reads echolm.replies*, groups echolm-gateway*
#   exporter  kafka-exporter: describes topics, groups and the cluster (consumer lag), reads nothing
set -euo pipefail
umask 077
for name in SCRAM_ADMIN_PASSWORD SCRAM_WORKER_PASSWORD SCRAM_GATEWAY_PASSWORD SCRAM_EXPORTER_PASSWORD; do
  if [ -z "${!name:-}" ]; then echo "topic-init: $name is not set" >&2; exit 1; fi
done

bin=/opt/kafka/bin
server=kafka:19092
props=/tmp/admin.properties
printf 'security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\n' > "$props"
printf 'sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="%s";\n' \
  "$SCRAM_ADMIN_PASSWORD" >> "$props"

user() {
  "$bin/kafka-configs.sh" --bootstrap-server "$server" --command-config "$props" --alter \
    --entity-type users --entity-name "$1" --add-config "SCRAM-SHA-512=[password=$2]"
}
acl() {
  "$bin/kafka-acls.sh" --bootstrap-server "$server" --command-config "$props" --add --force "$@" >/dev/null
}

user worker "$SCRAM_WORKER_PASSWORD"
user gateway "$SCRAM_GATEWAY_PASSWORD"
user exporter "$SCRAM_EXPORTER_PASSWORD"

acl --allow-principal User:worker --operation All --resource-pattern-type prefixed --topic echolm
acl --allow-principal User:worker --operation All --resource-pattern-type prefixed --group echolm
# kafka.processing_guarantee=exactly_once: faust's transactional producers (ids start with the app id)
acl --allow-principal User:worker --operation All --resource-pattern-type prefixed --transactional-id echolm

acl --allow-principal User:gateway --operation Write --operation Describe --topic echolm.requests
acl --allow-principal User:gateway --operation Write --operation Describe --topic echolm.feedback
acl --allow-principal User:gateway --operation Read --operation Describe \
  --resource-pattern-type prefixed --topic echolm.replies
acl --allow-principal User:gateway --operation Read --operation Describe \
  --resource-pattern-type prefixed --group echolm-gateway

acl --allow-principal User:exporter --operation Describe --operation DescribeConfigs --topic '*'
acl --allow-principal User:exporter --operation Describe --group '*'
acl --allow-principal User:exporter --operation Describe --cluster
echo "topic-init: SCRAM users worker, gateway, exporter and their ACLs are in place"
