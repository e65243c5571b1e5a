//! `--recovery-env` refuses the variables that make the dynamic loader or the C library
//! load code or data from where the value points: the recovery command runs with the
//! observer's privileges (root, on most hosts), and such a value would hand them to whoever
//! wrote the file it names. `--i-accept-recovery-env-loader-variables` lets them through.
//!
//! The list: every `LD_*` (the dynamic loader's, glibc's and musl's), and the other
//! variables glibc itself drops for setuid programs (`unsecvars.h`), but `TMPDIR`.

/// glibc's other unsafe variables: character-set modules (`GCONV_PATH`), tunables,
/// locale and message catalogues, malloc tracing, resolver configuration.
const LIBC_VARIABLES: [&str; 12] = [
    "GCONV_PATH",
    "GETCONF_DIR",
    "GLIBC_TUNABLES",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "LOCPATH",
    "MALLOC_TRACE",
    "NIS_PATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "TZDIR",
];

pub fn is_loader_variable(name: &str) -> bool {
    name.starts_with("LD_") || LIBC_VARIABLES.contains(&name)
}

/// The first loader variable among `env`'s names, unless they are allowed.
pub fn refused(env: &[(String, String)], allowed: bool) -> Option<&str> {
    if allowed {
        return None;
    }
    env.iter()
        .map(|(name, _)| name.as_str())
        .find(|name| is_loader_variable(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(names: &[&str]) -> Vec<(String, String)> {
        names.iter().map(|n| (n.to_string(), "x".into())).collect()
    }

    #[test]
    fn loader_variables_are_refused_unless_allowed() {
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "LD_AUDIT",
            "GCONV_PATH",
            "GLIBC_TUNABLES",
        ] {
            assert_eq!(refused(&env(&["A", name]), false), Some(name));
            assert_eq!(refused(&env(&["A", name]), true), None);
        }
        // Names are case-sensitive to the loader, and a prefix elsewhere is no loader's.
        assert_eq!(
            refused(
                &env(&["TOKEN", "ld_preload", "MY_LD_PATH", "TMPDIR"]),
                false
            ),
            None
        );
    }
}
