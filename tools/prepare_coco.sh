#!/bin/sh
# Download COCO 2014 and the Karpathy caption annotations of the InternVL2 COCO tutorial, then validate them.
# POSIX sh (runs under dash). See --help.
set -eu

usage() {
    cat <<'EOF'
Usage: tools/prepare_coco.sh [--with-test2015] [--no-validate] [--help]

Downloads into $COCO_ROOT (default data/coco), the layout the fine-tune and evaluate.sh read:

  train2014/  val2014/        COCO 2014 images (13.5 GB + 6.6 GB of zips, as much again unpacked)
  test2015/                   only with --with-test2015 (12.7 GB zip; the caption tutorial does not use it)
  annotations/coco_karpathy_train_567k.jsonl   566,747 train captions (Karpathy train + restval)
  annotations/coco_karpathy_test.json          5,000 test images with their reference captions
  annotations/coco_karpathy_test_gt.json       the same references in COCO format, for pycocotools

then runs `python -m internvl_chat.cli.validate_data --root $COCO_ROOT`.

Resumable: run it again after an interruption. Partial downloads (*.part) continue where they stopped,
finished archives are not fetched again, and an archive is unpacked only once (markers in
$COCO_ROOT/.prepare_coco/). With no internet it stops at once with a message; build a synthetic COCO in
the same layout instead with `python tools/make_synthetic_coco.py`.

Options:
  --with-test2015   also download test2015.zip (same as WITH_TEST2015=1)
  --no-validate     skip the validation at the end
  -h, --help        this text

Environment:
  COCO_ROOT               where the data goes (default data/coco, relative to the current directory)
  WITH_TEST2015=1         also download test2015
  DELETE_ZIPS=1           delete each image zip once it is unpacked (saves ~20 GB)
  PREPARE_COCO_TIMEOUT    seconds to wait for a server before giving up (default 30)
  DOWNLOADER=wget|curl    force one (default: wget if installed, else curl)
  COCO_IMAGES_URL         base URL of the image zips (default http://images.cocodataset.org/zips)
  KARPATHY_URL            base URL of the annotation files
                          (default https://github.com/OpenGVLab/InternVL/releases/download/data)
  PYTHON                  interpreter for the validation (default .venv/bin/python, else python3)
  VALIDATE_WORKERS        threads for the image checks (default 16)
EOF
}

WITH_TEST2015=${WITH_TEST2015:-0}
VALIDATE=1
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --with-test2015) WITH_TEST2015=1 ;;
        --no-validate) VALIDATE=0 ;;
        *) printf 'prepare_coco.sh: unknown argument "%s" (see tools/prepare_coco.sh --help)\n' "$1" >&2; exit 2 ;;
    esac
    shift
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
COCO_ROOT=${COCO_ROOT:-data/coco}
TIMEOUT=${PREPARE_COCO_TIMEOUT:-30}
COCO_IMAGES_URL=${COCO_IMAGES_URL:-http://images.cocodataset.org/zips}
KARPATHY_URL=${KARPATHY_URL:-https://github.com/OpenGVLab/InternVL/releases/download/data}
DELETE_ZIPS=${DELETE_ZIPS:-0}
VALIDATE_WORKERS=${VALIDATE_WORKERS:-16}
ANNOTATIONS=$COCO_ROOT/annotations
MARKERS=$COCO_ROOT/.prepare_coco
TRAIN_JSONL=coco_karpathy_train_567k.jsonl

log() { printf '[prepare_coco] %s\n' "$*"; }
die() { printf 'prepare_coco.sh: error: %s\n' "$*" >&2; exit 1; }

case $TIMEOUT in
    ''|*[!0-9]*) die "PREPARE_COCO_TIMEOUT must be a whole number of seconds, got '$TIMEOUT'" ;;
esac

# ------------------------------------------------------------------------------------------- tools

if [ -z "${DOWNLOADER:-}" ]; then
    if command -v wget >/dev/null 2>&1; then
        DOWNLOADER=wget
    elif command -v curl >/dev/null 2>&1; then
        DOWNLOADER=curl
    else
        die "neither wget nor curl is installed; install one (e.g. apt-get install wget) and rerun"
    fi
fi
case $DOWNLOADER in
    wget|curl) command -v "$DOWNLOADER" >/dev/null 2>&1 || die "DOWNLOADER=$DOWNLOADER but it is not installed" ;;
    *) die "DOWNLOADER must be wget or curl, got '$DOWNLOADER'" ;;
esac

if [ -n "${PYTHON:-}" ]; then
    :
elif [ -x "$REPO/.venv/bin/python" ]; then
    PYTHON=$REPO/.venv/bin/python
else
    PYTHON=python3
fi

# ------------------------------------------------------------------------------------------- steps

host_of() { printf '%s\n' "$1" | sed 's#^[A-Za-z]*://##; s#[/:].*##'; }

# Fail in seconds, not after a long wait, when a server cannot be reached: before any download starts.
# Only the connection matters here: an HTTP error answer (some file hosts refuse HEAD requests) is reported
# and the download itself then decides.
check_reachable() {
    url=$1
    rc=0
    if [ "$DOWNLOADER" = wget ]; then
        wget -q --spider -T "$TIMEOUT" -t 1 "$url" 2>/dev/null || rc=$?
        # wget: 4 = network failure (DNS, refused, timeout); 8 = the server answered with an error.
        case $rc in
            0) ;;
            4) unreachable "$url" ;;
            8) answered_with_error "$url" ;;
            *) die "checking $url failed (wget exit status $rc)" ;;
        esac
    else
        # No -L: the first server's answer (a redirect for GitHub) already proves the connection.
        curl -sSf -o /dev/null -I --connect-timeout "$TIMEOUT" --max-time $((TIMEOUT * 2)) "$url" 2>/dev/null ||
            rc=$?
        # curl: 5/6 = cannot resolve proxy/host, 7 = cannot connect, 28 = timeout; 22 = HTTP error.
        case $rc in
            0) ;;
            5|6|7|28|35|56) unreachable "$url" ;;
            22) answered_with_error "$url" ;;
            *) die "checking $url failed (curl exit status $rc)" ;;
        esac
    fi
}

answered_with_error() {
    log "warning: $(host_of "$1") is reachable but answered the check of $1 with an error;"
    log "         trying the download anyway (if it fails, the file moved: set COCO_IMAGES_URL / KARPATHY_URL)"
}

unreachable() {
    cat >&2 <<EOF
prepare_coco.sh: error: cannot reach $(host_of "$1") (tried $1 with a ${TIMEOUT}s timeout).
This machine seems to have no internet access (or a proxy/firewall blocks it). Nothing was downloaded.
  - Run tools/prepare_coco.sh where the internet is reachable and copy $COCO_ROOT here,
    or point COCO_IMAGES_URL / KARPATHY_URL at a mirror you can reach.
  - Or, with no download at all, build a synthetic COCO in the same layout:
      python tools/make_synthetic_coco.py --out $COCO_ROOT
EOF
    exit 1
}

# fetch URL DEST: download to DEST.part (continued if it exists), then rename; skip if DEST exists.
fetch() {
    url=$1
    dest=$2
    if [ -f "$dest" ]; then
        log "already downloaded: $dest"
        return 0
    fi
    log "downloading $url"
    if [ "$DOWNLOADER" = wget ]; then
        if [ -t 2 ]; then progress=bar; else progress=dot:giga; fi
        wget -c -T "$TIMEOUT" -t 5 --progress="$progress" -O "$dest.part" "$url" ||
            die "downloading $url failed; rerun to resume (the partial file $dest.part is kept)"
    else
        curl -fL --retry 5 --connect-timeout "$TIMEOUT" -C - -o "$dest.part" "$url" ||
            die "downloading $url failed; rerun to resume (the partial file $dest.part is kept)"
    fi
    mv "$dest.part" "$dest"
}

# unpack ZIP DIR: unzip into DIR (python's zipfile when unzip is missing).
unpack() {
    log "unpacking $1 into $2 (the image archives take minutes; no progress is shown meanwhile)"
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$1" -d "$2"
    else
        "$PYTHON" -m zipfile -e "$1" "$2"
    fi || die "unpacking $1 failed; the file may be damaged: delete it and rerun to download it again"
}

# images_present NAME: unpacked by an earlier run, or put there by hand (a folder and no archive to unpack).
images_present() {
    [ -f "$MARKERS/$1.done" ] && return 0
    [ -d "$COCO_ROOT/$1" ] && [ ! -e "$COCO_ROOT/$1.zip" ] && [ ! -e "$COCO_ROOT/$1.zip.part" ]
}

# train_jsonl_present: unpacked by an earlier run, or put there by hand.
train_jsonl_present() {
    [ -f "$ANNOTATIONS/$TRAIN_JSONL" ] || return 1
    [ -f "$MARKERS/train_jsonl.done" ] && return 0
    [ ! -e "$ANNOTATIONS/coco_karpathy_train_567k.zip" ] && [ ! -e "$ANNOTATIONS/coco_karpathy_train_567k.zip.part" ]
}

# image_archive NAME: fetch and unpack NAME.zip (which holds NAME/) once.
image_archive() {
    name=$1
    if images_present "$name"; then
        log "already there: $COCO_ROOT/$name/"
        return 0
    fi
    fetch "$COCO_IMAGES_URL/$name.zip" "$COCO_ROOT/$name.zip"
    log "unpacking $name.zip into $COCO_ROOT/ (tens of thousands of files; a few minutes)"
    unpack "$COCO_ROOT/$name.zip" "$COCO_ROOT"
    [ -d "$COCO_ROOT/$name" ] || die "$COCO_ROOT/$name.zip did not contain a $name/ folder; delete it and rerun"
    touch "$MARKERS/$name.done"
    if [ "$DELETE_ZIPS" = 1 ]; then
        rm -f "$COCO_ROOT/$name.zip"
    fi
}

train_annotations() {
    if train_jsonl_present; then
        log "already there: $ANNOTATIONS/$TRAIN_JSONL"
        return 0
    fi
    fetch "$KARPATHY_URL/coco_karpathy_train_567k.zip" "$ANNOTATIONS/coco_karpathy_train_567k.zip"
    unpack "$ANNOTATIONS/coco_karpathy_train_567k.zip" "$ANNOTATIONS"
    if [ ! -f "$ANNOTATIONS/$TRAIN_JSONL" ]; then
        # The tutorial expects the jsonl at the top of the zip; accept it one folder down too.
        found=$(find "$ANNOTATIONS" -name "$TRAIN_JSONL" -type f | head -n 1)
        [ -n "$found" ] || die "$ANNOTATIONS/coco_karpathy_train_567k.zip has no $TRAIN_JSONL; delete the zip and rerun"
        mv "$found" "$ANNOTATIONS/$TRAIN_JSONL"
    fi
    touch "$MARKERS/train_jsonl.done"
}

warn_if_disk_is_short() {
    need_gb=0
    images_present train2014 || need_gb=$((need_gb + 27))
    images_present val2014 || need_gb=$((need_gb + 14))
    if [ "$WITH_TEST2015" = 1 ] && ! images_present test2015; then need_gb=$((need_gb + 26)); fi
    free_kb=$(df -Pk "$COCO_ROOT" 2>/dev/null | awk 'NR == 2 { print $4 }')
    case $free_kb in ''|*[!0-9]*) return 0 ;; esac
    free_gb=$((free_kb / 1048576))
    if [ "$free_gb" -lt "$need_gb" ]; then
        log "warning: $COCO_ROOT has ${free_gb} GB free; the remaining downloads need about ${need_gb} GB"
        log "         (zip + unpacked; DELETE_ZIPS=1 deletes each zip once it is unpacked)"
    fi
}

# ------------------------------------------------------------------------------------------- main

log "COCO root: $COCO_ROOT (downloader: $DOWNLOADER, timeout ${TIMEOUT}s)"

# Probe each server only if something still has to come from it.
images_needed=0
for name in train2014 val2014; do
    images_present "$name" || images_needed=1
done
if [ "$WITH_TEST2015" = 1 ] && ! images_present test2015; then images_needed=1; fi
annotations_needed=0
for file in coco_karpathy_test.json coco_karpathy_test_gt.json; do
    [ -f "$ANNOTATIONS/$file" ] || annotations_needed=1
done
train_jsonl_present || annotations_needed=1
if [ "$images_needed" = 1 ]; then
    check_reachable "$COCO_IMAGES_URL/val2014.zip"
fi
if [ "$annotations_needed" = 1 ]; then
    check_reachable "$KARPATHY_URL/coco_karpathy_test.json"
fi
mkdir -p "$ANNOTATIONS" "$MARKERS"
if [ "$images_needed" = 1 ]; then
    warn_if_disk_is_short
fi

# The small annotation files first: a broken link shows up before hours of image downloads.
fetch "$KARPATHY_URL/coco_karpathy_test.json" "$ANNOTATIONS/coco_karpathy_test.json"
fetch "$KARPATHY_URL/coco_karpathy_test_gt.json" "$ANNOTATIONS/coco_karpathy_test_gt.json"
train_annotations
image_archive val2014
image_archive train2014
if [ "$WITH_TEST2015" = 1 ]; then
    image_archive test2015
fi
log "downloads complete in $COCO_ROOT"

if [ "$VALIDATE" = 1 ]; then
    "$PYTHON" -c 'import PIL, pycocotools, tqdm' 2>/dev/null ||
        die "cannot validate: $PYTHON lacks pillow/pycocotools/tqdm; set up the environment" \
            "(sh tools/setup_env.sh) or set PYTHON, then rerun (the downloads are kept)"
    log "validating (internvl-validate-data --root $COCO_ROOT)"
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m internvl_chat.cli.validate_data \
        --root "$COCO_ROOT" --workers "$VALIDATE_WORKERS" ||
        die "the downloaded data did not validate (see the messages above)"
fi
log "done: $COCO_ROOT is ready"
