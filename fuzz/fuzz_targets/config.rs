//! Configuration text → parse, `${VAR}` substitution, then `plan::compile` (every check and
//! parse `gateway check` and `gateway run` make). Any input must end in a plan or a
//! `ConfigError`, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let vars: HashMap<String, String> = [("PORT".to_string(), "8080".to_string())].into();
    if let Ok(config) = gateway::config::parse(Path::new("fuzz.yaml"), text, &vars) {
        let _ = gateway::plan::compile(&gateway::config::LoadedConfig {
            path: "fuzz.yaml".into(),
            source_hash: 0,
            config,
        });
    }
});
