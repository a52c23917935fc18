# RPM %post of octopus-server (as the Debian postinst): `octopus` on the PATH,
# and the server's data folder, readable by root only.
ln -sfn /opt/octopus/server/octopus /usr/bin/octopus
mkdir -p /var/lib/octopus/server
chmod 0700 /var/lib/octopus/server
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
