//! `cloudcore crds`: prints or writes the CRD manifests generated from the Rust types.

use std::path::Path;

use anyhow::Context;
use kedge_common::crd::{all_crds, crd_file_name, crd_yaml};

/// All CRDs as one multi-document YAML stream.
pub fn render_all() -> anyhow::Result<String> {
    let mut out = String::new();
    for crd in all_crds() {
        out.push_str(&crd_yaml(&crd).context("rendering CRD")?);
    }
    Ok(out)
}

/// Writes one file per CRD into `dir` (the repository's `crds/`).
pub fn write_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for crd in all_crds() {
        let path = dir.join(crd_file_name(&crd));
        let yaml = crd_yaml(&crd).context("rendering CRD")?;
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `crds/` is generated; fail when it drifts from the types. Fix with `hack/update-crds.sh`.
    #[test]
    fn crds_directory_matches_generated_output() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        let mut expected: Vec<String> = Vec::new();
        for crd in all_crds() {
            let name = crd_file_name(&crd);
            let generated = crd_yaml(&crd).unwrap();
            let on_disk = std::fs::read_to_string(dir.join(&name))
                .unwrap_or_else(|e| panic!("crds/{name} missing ({e}); run hack/update-crds.sh"));
            if on_disk != generated {
                let line = on_disk
                    .lines()
                    .zip(generated.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or_else(|| on_disk.lines().count().min(generated.lines().count()));
                panic!(
                    "crds/{name} differs from the generated CRD at line {}:\n  on disk:   {:?}\n  generated: {:?}\nrun hack/update-crds.sh",
                    line + 1,
                    on_disk.lines().nth(line),
                    generated.lines().nth(line)
                );
            }
            expected.push(name);
        }
        let mut present: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
        present.sort();
        expected.sort();
        assert_eq!(present, expected, "stray files in crds/");
    }

    #[test]
    fn render_all_is_every_file_concatenated() {
        let all = render_all().unwrap();
        assert_eq!(all.matches("\n---\n").count() + 1, all_crds().len());
        assert!(all.contains("kind: CustomResourceDefinition"));
    }
}
