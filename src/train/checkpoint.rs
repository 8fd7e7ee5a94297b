//! Checkpoints on disk, written so that a crash or kill at any moment leaves the last
//! good one readable.
//!
//! A checkpoint is a folder: a complete model folder in Hugging Face layout
//! (`config.json`, `tokenizer.json`, `model.safetensors` holding every trainable tensor:
//! the encoder's, under their original names, and any heads) that `--model` accepts as
//! is, plus `optimizer.safetensors` (AdamW's moments) and `trainer.json` (step, seed,
//! settings, history) for `--resume`. Each is written into a hidden temporary folder
//! and renamed into place; the file `latest` (itself replaced atomically) names the
//! newest complete one.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use super::TrainError;

/// The files of a model folder that are copied from the base model unchanged.
const COPIED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_FILE: &str = "trainer.json";
const LATEST_FILE: &str = "latest";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` through a temporary file in the same folder, fsync and rename.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        use std::io::Write;
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// What goes into a model folder besides the copied base files.
pub struct ModelContents<'a> {
    /// The model the run started from (its config and tokenizer are copied).
    pub base_dir: &'a Path,
    pub varmap: &'a VarMap,
    /// Extra JSON files, e.g. the baseline's label lists: (file name, content).
    pub extra: Vec<(&'static str, String)>,
}

/// Writes a complete model folder into a fresh hidden folder beside `dst` and returns
/// that folder; the caller renames it into place.
fn write_model_tmp(dst: &Path, contents: &ModelContents) -> Result<PathBuf, TrainError> {
    let parent = dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let name = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.tmp.{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    for file in COPIED_FILES {
        let from = contents.base_dir.join(file);
        fs::copy(&from, tmp.join(file)).map_err(io_err(&from))?;
    }
    let weights = tmp.join(WEIGHTS_FILE);
    contents.varmap.save(&weights).map_err(|source| TrainError::Candle { what: format!("saving {}", weights.display()), source })?;
    for (file, text) in &contents.extra {
        fs::write(tmp.join(file), text).map_err(io_err(&tmp.join(file)))?;
    }
    sync_dir_files(&tmp)?;
    Ok(tmp)
}

fn sync_dir_files(dir: &Path) -> Result<(), TrainError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io_err(&path))?;
    }
    Ok(())
}

/// Replaces the model folder `dst` (e.g. the best model so far). The old folder is
/// moved aside before the new one is renamed in, and removed only after.
pub fn save_model_folder(dst: &Path, contents: &ModelContents) -> Result<(), TrainError> {
    let tmp = write_model_tmp(dst, contents)?;
    let old = dst.with_file_name(format!(".{}.old.{}", dst.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let had_old = dst.exists();
    if had_old {
        fs::rename(dst, &old).map_err(io_err(dst))?;
    }
    fs::rename(&tmp, dst).map_err(io_err(dst))?;
    if had_old {
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(())
}

/// Saves training state as `dir/step-NNNNNNN` and points `dir/latest` at it; keeps the
/// newest `keep` checkpoints.
pub fn save_checkpoint(
    dir: &Path,
    step: u64,
    contents: &ModelContents,
    optimizer: HashMap<String, Tensor>,
    trainer_json: &str,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let dst = dir.join(format!("step-{step:07}"));
    let tmp = write_model_tmp(&dst, contents)?;
    let opt_path = tmp.join(OPTIMIZER_FILE);
    candle_core::safetensors::save(&optimizer, &opt_path)
        .map_err(|source| TrainError::Candle { what: format!("saving {}", opt_path.display()), source })?;
    write_file_atomic(&tmp.join(TRAINER_FILE), trainer_json.as_bytes())?;
    fs::File::open(&opt_path).and_then(|f| f.sync_all()).map_err(io_err(&opt_path))?;
    if dst.exists() {
        fs::remove_dir_all(&dst).map_err(io_err(&dst))?;
    }
    fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    write_file_atomic(&dir.join(LATEST_FILE), dst.file_name().unwrap_or_default().to_string_lossy().as_bytes())?;
    prune(dir, keep.max(1))?;
    Ok(dst)
}

fn prune(dir: &Path, keep: usize) -> Result<(), TrainError> {
    let mut steps: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
        .collect();
    steps.sort();
    let n = steps.len();
    for old in steps.into_iter().take(n.saturating_sub(keep)) {
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(())
}

/// A checkpoint read back for `--resume`.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub weights: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub trainer_json: String,
}

/// The newest complete checkpoint under `dir`, if any.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<Checkpoint>, TrainError> {
    let pointer = dir.join(LATEST_FILE);
    if !pointer.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&pointer).map_err(io_err(&pointer))?;
    let ckpt = dir.join(name.trim());
    let load = |file: &str| -> Result<HashMap<String, Tensor>, TrainError> {
        let path = ckpt.join(file);
        candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|source| TrainError::Candle { what: format!("reading checkpoint {}", path.display()), source })
    };
    let trainer_path = ckpt.join(TRAINER_FILE);
    Ok(Some(Checkpoint {
        weights: load(WEIGHTS_FILE)?,
        optimizer: load(OPTIMIZER_FILE)?,
        trainer_json: fs::read_to_string(&trainer_path).map_err(io_err(&trainer_path))?,
        dir: ckpt,
    }))
}

/// Copies saved weights into the variables of `varmap` (names and shapes must match).
pub fn restore_weights(varmap: &VarMap, weights: &HashMap<String, Tensor>, source: &Path) -> Result<(), TrainError> {
    let data = varmap.data().lock().expect("varmap lock poisoned");
    for (name, var) in data.iter() {
        let t = weights.get(name).ok_or_else(|| TrainError::State {
            path: source.to_path_buf(),
            message: format!("checkpoint has no tensor {name}"),
        })?;
        var.set(t).map_err(|e| TrainError::State { path: source.to_path_buf(), message: format!("tensor {name}: {e}") })?;
    }
    Ok(())
}
