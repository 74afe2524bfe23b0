#!/bin/bash
# Entry point of the compose `kafka` service (apache/kafka image, user appuser).
#
# 1. Build the broker config: deploy/kafka/server.properties plus the SCRAM login the broker uses on
#    its own INTERNAL listener (inter-broker traffic), from SCRAM_ADMIN_PASSWORD.
# 2. Format the log directory the first time only, creating the `admin` SCRAM credential in the
#    bootstrap metadata (KIP-900: kafka-storage format --add-scram), so the broker can authenticate
#    before any user exists. Service users are created later, by topic-init, as admin.
# 3. Write /tmp/admin.properties for the healthcheck, then exec Kafka.
#
# Passwords: letters and digits only (`openssl rand -hex 24`); they are spliced into JAAS strings.
set -euo pipefail
umask 077
: "${SCRAM_ADMIN_PASSWORD:?the kafka service needs SCRAM_ADMIN_PASSWORD (KAFKA_ADMIN_PASSWORD in .env)}"

config=/tmp/server.properties
login="org.apache.kafka.common.security.scram.ScramLoginModule required username=\"admin\" password=\"${SCRAM_ADMIN_PASSWORD}\";"
cp /etc/echolm/kafka/server.properties "$config"
printf '\nlistener.name.internal.scram-sha-512.sasl.jaas.config=%s\n' "$login" >> "$config"
printf 'security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\nsasl.jaas.config=%s\n' "$login" \
  > /tmp/admin.properties

if [ ! -f /var/lib/kafka/data/meta.properties ]; then
  /opt/kafka/bin/kafka-storage.sh format --config "$config" \
    --cluster-id "$(/opt/kafka/bin/kafka-storage.sh random-uuid)" \
    --add-scram "SCRAM-SHA-512=[name=admin,password=${SCRAM_ADMIN_PASSWORD}]"
fi
exec /opt/kafka/bin/kafka-server-start.sh "$config"
