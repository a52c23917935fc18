#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| octo_fuzz::package_name(data));
