//! Configuration text → parse, `${VAR}` substitution, validation, route compilation. Any input
//! must end in a configuration or a `ConfigError`, never a panic or a hang.
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
        let _ = gateway::routing::Router::new(&config.routes);
        for route in &config.routes {
            let _ = gateway::routing::compile_rewrite(route);
        }
    }
});
