#!/usr/bin/env bash
# Download Llama 2 weights and the tokenizer from the presigned URL that Meta
# sends by email after the license is accepted.
#
#   bash download.sh                      # downloads into the current directory
#   TARGET_FOLDER=/data/llama bash download.sh
#   printf '%s\n' "$URL" 7B,7B-chat | bash download.sh   # non-interactive
#
# Downloads are resumable: re-running the script continues partial files
# (wget --continue) and skips finished ones.
#
# Written for bash 3.2 too (the macOS default), so no associative arrays or
# ${var,,}.

set -euo pipefail

ALL_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"
TARGET_FOLDER="${TARGET_FOLDER:-.}"

die() {
    echo "ERROR: $*" >&2
    exit 1
}

# `read` fails at end of input (e.g. piped answers without a final newline);
# that just means an empty answer, so don't let `set -e` abort on it.
read -r -p "Enter the URL from email: " PRESIGNED_URL || true
echo ""
read -r -p "Enter the list of models to download without spaces (${ALL_MODELS}), or press Enter for all: " MODEL_LIST || true
echo ""

[ -n "$PRESIGNED_URL" ] || die "no URL given; paste the presigned URL from the email."
case "$PRESIGNED_URL" in
    *'*'*) ;;
    *) die "the URL has no '*' in it; paste the whole presigned URL from the email." ;;
esac

MODEL_LIST="${MODEL_LIST// /}"
[ -n "$MODEL_LIST" ] || MODEL_LIST="$ALL_MODELS"

# Prints "<folder> <number of shards>" for a model name; fails for unknown names.
model_info() {
    local name
    name=$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')
    case "$name" in
        7B)        echo "llama-2-7b 1" ;;
        13B)       echo "llama-2-13b 2" ;;
        70B)       echo "llama-2-70b 8" ;;
        7B-CHAT)   echo "llama-2-7b-chat 1" ;;
        13B-CHAT)  echo "llama-2-13b-chat 2" ;;
        70B-CHAT)  echo "llama-2-70b-chat 8" ;;
        *) return 1 ;;
    esac
}

# Validate every name before downloading anything, so a typo doesn't leave a
# half-finished download behind.
MODELS=()
IFS=',' read -r -a REQUESTED <<< "$MODEL_LIST"
# (The ${a[@]+...} form keeps bash 3.2 with `set -u` happy on an empty array.)
for m in ${REQUESTED[@]+"${REQUESTED[@]}"}; do
    [ -n "$m" ] || continue
    model_info "$m" > /dev/null || die "unknown model '${m}'. Valid names: ${ALL_MODELS}"
    MODELS+=("$m")
done
[ "${#MODELS[@]}" -gt 0 ] || die "no models selected. Valid names: ${ALL_MODELS}"

# fetch <path relative to the download root>
fetch() {
    local rel="$1"
    local dest="${TARGET_FOLDER}/${rel}"
    # The presigned URL has a single '*' standing for the file's path.
    local url=${PRESIGNED_URL/'*'/"$rel"}
    echo "Downloading ${rel}"
    if ! wget --continue --progress=bar:force -O "$dest" "$url"; then
        # With -O, wget creates the output file even when the request fails;
        # remove it if empty, but keep real partial data so a re-run resumes.
        [ -s "$dest" ] || rm -f "$dest"
        die "failed to download ${rel} (see the wget output above); re-run to resume."
    fi
}

# check_md5 <checklist>: verify "<md5>  <file>" lines, in the current directory.
check_md5() {
    local checklist="$1"
    if command -v md5sum > /dev/null 2>&1; then
        md5sum -c "$checklist"
        return
    fi
    # macOS has no md5sum; `md5 -r FILE` prints "<md5> FILE", so check by hand.
    local expected name actual status=0
    while read -r expected name || [ -n "$expected" ]; do
        [ -n "$expected" ] || continue
        name="${name#\*}"  # md5sum's binary-mode marker
        if [ ! -f "$name" ]; then
            echo "${name}: FAILED open or read"
            status=1
            continue
        fi
        actual=$(md5 -r "$name" | cut -d' ' -f1)
        if [ "$actual" = "$expected" ]; then
            echo "${name}: OK"
        else
            echo "${name}: FAILED"
            status=1
        fi
    done < "$checklist"
    return "$status"
}

# verify <folder relative to the download root> <checklist name> <label for messages>
verify() {
    local dir="$1" checklist="$2" label="$3"
    echo "Verifying checksums: ${label}"
    # Subshell: cd only for the check. `set -e` is off inside `if !`, so the
    # exit status of check_md5 is what decides.
    if ! (cd "${TARGET_FOLDER}/${dir}" && check_md5 "$checklist"); then
        die "checksum mismatch in ${label}: delete the bad file and re-run to resume."
    fi
}

mkdir -p "$TARGET_FOLDER"

echo "Downloading LICENSE and Acceptable Usage Policy"
fetch "LICENSE"
fetch "USE_POLICY.md"

echo "Downloading tokenizer"
fetch "tokenizer.model"
fetch "tokenizer_checklist.chk"
verify "." "tokenizer_checklist.chk" "the tokenizer"

for m in "${MODELS[@]}"; do
    read -r folder shards <<< "$(model_info "$m")"
    echo "Downloading ${m} into ${folder}"
    mkdir -p "${TARGET_FOLDER}/${folder}"
    for ((i = 0; i < shards; i++)); do
        fetch "${folder}/consolidated.$(printf '%02d' "$i").pth"
    done
    fetch "${folder}/params.json"
    fetch "${folder}/checklist.chk"
    verify "$folder" "checklist.chk" "$folder"
done

echo "Done: downloaded ${MODEL_LIST} into ${TARGET_FOLDER}"
