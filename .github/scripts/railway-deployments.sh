#!/usr/bin/env bash
# The deployments of one Railway service, for .github/workflows/deploy.yml
# (docs/deployment.md#rollback-on-railway):
#
#   live SERVICE               prints the id of the deployment serving now (nothing when none)
#   rollback SERVICE PREVIOUS  when a deployment other than PREVIOUS serves, rolls back to
#                              PREVIOUS (the dashboard's Rollback: its image and variables)
#                              and waits until the service is served by it again
#
# Needs the Railway CLI, jq, RAILWAY_TOKEN (a project token) and RAILWAY_ENVIRONMENT_NAME.
set -euo pipefail

ROLLBACK_WAIT_S=600
POLL_S=10

live() {
    railway deployment list --service "$1" --environment "$RAILWAY_ENVIRONMENT_NAME" --limit 20 --json |
        jq -r '[.[] | select(.status == "SUCCESS")] | sort_by(.createdAt) | last | .id // empty'
}

rollback() {
    local service=$1 previous=$2 failed now waited=0
    if [ -z "$previous" ]; then
        echo "$service: no deployment served before this run; nothing to roll back to" >&2
        return 1
    fi
    failed=$(live "$service")
    if [ "$failed" = "$previous" ]; then
        echo "$service: still served by the deployment from before this run"
        return 0
    fi
    # Railway's public API: the CLI has no rollback command of its own. `$id` is GraphQL's.
    # shellcheck disable=SC2016
    railway api 'mutation Rollback($id: String!) { deploymentRollback(id: $id) }' --raw-var "id=$previous"
    while [ "$waited" -lt "$ROLLBACK_WAIT_S" ]; do
        now=$(live "$service")
        if [ -n "$now" ] && [ "$now" != "$failed" ]; then
            echo "$service: rolled back"
            return 0
        fi
        sleep "$POLL_S"
        waited=$((waited + POLL_S))
    done
    echo "$service: the rollback was not serving after ${ROLLBACK_WAIT_S} s" >&2
    return 1
}

case "${1:-}" in
    live) live "$2" ;;
    rollback) rollback "$2" "${3:-}" ;;
    *)
        echo "usage: $0 live SERVICE | rollback SERVICE PREVIOUS_DEPLOYMENT_ID" >&2
        exit 2
        ;;
esac
