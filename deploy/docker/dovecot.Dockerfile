# A Dovecot 2.3 (Debian 12) that leaves all authentication to an authd container
# sharing the /run/authd volume: the compose example's sidecar.
# Build from the repository root:  docker build -f deploy/docker/dovecot.Dockerfile .
FROM debian:12-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      dovecot-core dovecot-imapd dovecot-lmtpd \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 5000 --user-group --home-dir /srv/mail --shell /usr/sbin/nologin vmail \
 && install -d -o vmail -g vmail -m 0750 /srv/mail

COPY deploy/dovecot/99-authd-route-a.conf /etc/dovecot/conf.d/99-authd-route-a.conf
COPY deploy/docker/dovecot-local.conf /etc/dovecot/local.conf

EXPOSE 143 24
CMD ["dovecot", "-F"]
