/opt/octopus/tentacle/Tentacle service --instance Tentacle --stop --uninstall
/opt/octopus/tentacle/Tentacle delete-instance --instance Tentacle
