//! The `tentacle` binary; everything is in the library (`octo_tentacle`).

fn main() {
    octo_tentacle::main();
}
