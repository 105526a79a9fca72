#!/usr/bin/env bash
# The run step of action.yml (the bnfold GitHub Action): fold the given models with bnfold,
# writing the JSON and JUnit reports; bnfold itself appends the job summary to
# $GITHUB_STEP_SUMMARY. Exit status: bnfold's (0 passed, 1 verification failed or --strict
# violated, 2 bad input or usage).
#
# Environment (action.yml maps its inputs onto these):
#   BNFOLD_MODELS        models: paths or globs (bash globs, ** included), separated by
#                        whitespace or newlines; a pattern that matches nothing is passed as is
#                        (bnfold then reports "no such file", exit 2)
#   BNFOLD_OPTIONS       further bnfold options, split like a shell command line (quotes work,
#                        nothing is expanded or executed; no word may hold a newline)
#   BNFOLD_JSON_REPORT   --json report path ("" for none)
#   BNFOLD_JUNIT_REPORT  --junit-xml report path ("" for none)
#   BNFOLD_PYTHON        the Python that has bnfold installed (default: python)
# Written to $GITHUB_OUTPUT when set: json-report, junit-report, exit-code.
set -euo pipefail

python=${BNFOLD_PYTHON:-python}
json_report=${BNFOLD_JSON_REPORT:-}
junit_report=${BNFOLD_JUNIT_REPORT:-}

shopt -s globstar 2>/dev/null || true  # (bash 3.2, macOS: no **)
models=()
set -f  # split the input into patterns on whitespace, without expanding them yet
# shellcheck disable=SC2206
patterns=(${BNFOLD_MODELS:-})
set +f
for pattern in ${patterns[@]+"${patterns[@]}"}; do
  saved_ifs=$IFS
  IFS=  # expand the glob without splitting: a matched path with spaces stays one word
  # shellcheck disable=SC2206
  matches=($pattern)
  IFS=$saved_ifs
  models+=("${matches[@]}")
done
shopt -u globstar 2>/dev/null || true
if [ "${#models[@]}" -eq 0 ]; then
  echo "bnfold action: error: the 'models' input names no model" >&2
  exit 2
fi

options=()
if [ -n "${BNFOLD_OPTIONS:-}" ]; then
  # shlex: quotes are honoured, nothing is evaluated
  split=$("$python" -c 'import shlex, sys
for word in shlex.split(sys.argv[1]):
    sys.stdout.write(word + "\n")' "$BNFOLD_OPTIONS") || {
    echo "bnfold action: error: the 'options' input is not a valid command line: $BNFOLD_OPTIONS" >&2
    exit 2
  }
  if [ -n "$split" ]; then
    while IFS= read -r word; do options+=("$word"); done <<< "$split"
  fi
fi

reports=()
for report in "$json_report" "$junit_report"; do
  if [ -n "$report" ]; then mkdir -p "$(dirname -- "$report")"; fi
done
if [ -n "$json_report" ]; then reports+=(--json "$json_report"); fi
if [ -n "$junit_report" ]; then reports+=(--junit-xml "$junit_report"); fi

status=0
# (${a[@]+"${a[@]}"}: an empty array under set -u in bash 3.2)
"$python" -m bnfold "${models[@]}" ${options[@]+"${options[@]}"} ${reports[@]+"${reports[@]}"} || status=$?

if [ -n "${GITHUB_OUTPUT:-}" ]; then
  {
    echo "json-report=$json_report"
    echo "junit-report=$junit_report"
    echo "exit-code=$status"
  } >> "$GITHUB_OUTPUT"
fi
exit "$status"
