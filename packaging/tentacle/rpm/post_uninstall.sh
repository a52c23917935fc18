# RPM %postun of octopus-tentacle. $1 is 0 when the package is erased (1 on
# an upgrade, when the new package's files are already in place). Erased: the
# `tentacle` link and the copies an upgrade from the server left beside the
# binary go; the instances' configuration (/etc/octopus/tentacle) stays (RPM
# has no purge: remove it by hand when wanted).
if [ "$1" = 0 ]; then
    if [ -L /usr/bin/tentacle ] && [ "$(readlink /usr/bin/tentacle)" = /opt/octopus/tentacle/Tentacle ]; then
        rm -f /usr/bin/tentacle
    fi
    rm -f /opt/octopus/tentacle/Tentacle.previous /opt/octopus/tentacle/.Tentacle.upgrade-*
    rmdir /opt/octopus/tentacle 2>/dev/null || true
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
