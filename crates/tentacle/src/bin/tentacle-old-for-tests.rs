//! The tentacle, reporting version 0.0.1: the older tentacle that the upgrade
//! tests (`tests/upgrade.rs`) upgrade to this build. Not packaged.

fn main() {
    octo_tentacle::main_reporting("0.0.1");
}
