//! The export and audit files' metrics, by file (`export`, `audit`) and operation.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabel {
    pub file: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileOpLabel {
    pub file: &'static str,
    pub op: &'static str,
}

/// The durable files' metrics (registered by `Metrics`).
#[derive(Clone)]
pub struct FileMetrics {
    pub errors: Family<FileOpLabel, Counter>,
    pub lost: Family<FileLabel, Counter>,
    pub rotations: Family<FileLabel, Counter>,
    pub sync_seconds: Family<FileLabel, Histogram>,
}

impl Default for FileMetrics {
    fn default() -> Self {
        FileMetrics {
            errors: Family::default(),
            lost: Family::default(),
            rotations: Family::default(),
            sync_seconds: Family::new_with_constructor(|| {
                // 10 us .. ~1.3 s
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    1e-5, 4.0, 9,
                ))
            }),
        }
    }
}

impl FileMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "varta_file_errors",
            "Failed operations on the export and audit files, by file and operation",
            self.errors.clone(),
        );
        registry.register(
            "varta_file_records_lost",
            "Export lines and audit records not written (full disk, no file, full queue)",
            self.lost.clone(),
        );
        registry.register(
            "varta_file_rotations",
            "Rotations of the export and audit files at their size limit",
            self.rotations.clone(),
        );
        registry.register(
            "varta_file_sync_seconds",
            "fdatasync duration of the export and audit files (off the event loop)",
            self.sync_seconds.clone(),
        );
    }
}
