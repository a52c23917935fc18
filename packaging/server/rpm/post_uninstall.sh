# RPM %postun of octopus-server. $1 is 0 when the package is erased (1 on an
# upgrade). Erased: the `octopus` link goes; the server's data
# (/var/lib/octopus/server: database, keys, packages) stays (RPM has no purge:
# remove it by hand when wanted).
if [ "$1" = 0 ]; then
    if [ -L /usr/bin/octopus ] && [ "$(readlink /usr/bin/octopus)" = /opt/octopus/server/octopus ]; then
        rm -f /usr/bin/octopus
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
