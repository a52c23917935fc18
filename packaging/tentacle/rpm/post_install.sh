# RPM %post of octopus-tentacle (as the Debian postinst): `tentacle` on the
# PATH is the installed binary.
ln -sfn /opt/octopus/tentacle/Tentacle /usr/bin/tentacle
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
