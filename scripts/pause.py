"""Pause and resume the exporter as a whole: the stream's event source mapping and the scheduled
reconcile, with the alarms a pause would set off silenced until the stream has caught up
(docs/operations.md, "Pausing and resuming").

  pause   the mapping and the schedule disabled; the actions of the alarms that a pause or its
          backlog sets off (IteratorAge, PropagationLag, ReconcilePassOverdue) turned off.
  resume  the mapping and the schedule enabled; once the stream has caught up (the mapping
          `Enabled`, then Lambda's IteratorAge since under the IteratorAge alarm's threshold in
          its last 5 minutes, at least 3 of them reported, or no datapoint for --quiet seconds:
          Lambda's metrics arrive minutes late), those alarm actions turned back on. Run again
          if --wait ran out.
  status  what is paused.

Usage: scripts/pause.py {pause,resume,status} [--env dev] [--wait 1200] [--quiet 300]
(AWS credentials and region as boto3 reads them; `make pause|resume|paused ENV=...`.)
"""
import argparse
import datetime
import sys
import time

import boto3

SILENCED = ("IteratorAge", "PropagationLag", "ReconcilePassOverdue")


class Exporter:
    def __init__(self, env):
        self.function = f"{env}-EcomSettingsExporterLambda"
        self.rule = f"{env}-EcomSettingsExporter-Reconcile"
        self.alarms = [f"{env}-EcomSettingsExporter-{name}" for name in SILENCED]
        self.aws_lambda = boto3.client("lambda")
        self.events = boto3.client("events")
        self.cloudwatch = boto3.client("cloudwatch")

    def mappings(self):
        """The stream's mappings to this function (on `live`, or the function where no alias is)."""
        configuration = self.aws_lambda.get_function_configuration(FunctionName=self.function)
        stream = configuration["Environment"]["Variables"]["SETTINGS_TABLE_STREAM_ARN"]
        found = self.aws_lambda.list_event_source_mappings(EventSourceArn=stream)["EventSourceMappings"]
        return [m for m in found if m["FunctionArn"].split(":")[6] == self.function]

    def set_enabled(self, enabled):
        for mapping in self.mappings():
            self.aws_lambda.update_event_source_mapping(UUID=mapping["UUID"], Enabled=enabled)
        (self.events.enable_rule if enabled else self.events.disable_rule)(Name=self.rule)

    def set_alarm_actions(self, enabled):
        (self.cloudwatch.enable_alarm_actions if enabled else self.cloudwatch.disable_alarm_actions)(
            AlarmNames=self.alarms)

    def status(self):
        mappings = {m["UUID"]: m["State"] for m in self.mappings()}
        rule = self.events.describe_rule(Name=self.rule)["State"]
        alarms = {a["AlarmName"]: a["ActionsEnabled"]
                  for a in self.cloudwatch.describe_alarms(AlarmNames=self.alarms)["MetricAlarms"]}
        return mappings, rule, alarms

    def caught_up(self, since, quiet):
        """Every mapping `Enabled`, and since `since` Lambda's IteratorAge under the alarm's
        threshold over its last 5 minutes (3 of them reported at least), or no datapoint at all
        for `quiet` seconds (an idle stream reports none)."""
        if any(m["State"] != "Enabled" for m in self.mappings()):
            return False
        alarm = self.cloudwatch.describe_alarms(AlarmNames=self.alarms[:1])["MetricAlarms"]
        threshold = alarm[0]["Threshold"] if alarm else 300_000
        now = datetime.datetime.now(datetime.timezone.utc)
        waited = (now - since).total_seconds()
        points = []
        if waited >= 1:
            points = self.cloudwatch.get_metric_statistics(
                Namespace="AWS/Lambda", MetricName="IteratorAge", Statistics=["Maximum"], Period=60,
                Dimensions=[{"Name": "FunctionName", "Value": self.function}],
                StartTime=since, EndTime=now)["Datapoints"]
        if not points:
            return waited >= quiet
        last = sorted(points, key=lambda p: p["Timestamp"])[-5:]
        return len(last) >= 3 and all(p["Maximum"] <= threshold for p in last)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["pause", "resume", "status"])
    parser.add_argument("--env", default="dev")
    parser.add_argument("--wait", type=float, default=1200, help="seconds to wait for the stream to catch up")
    parser.add_argument("--quiet", type=float, default=300, help="seconds without a datapoint that count as caught up")
    args = parser.parse_args(argv)
    exporter = Exporter(args.env)
    if args.action == "pause":
        exporter.set_alarm_actions(False)
        exporter.set_enabled(False)
        print(f"paused: the stream's mapping and the schedule `{exporter.rule}` disabled; "
              f"actions off for {', '.join(exporter.alarms)}. Records wait in the stream until "
              "MaximumRecordAgeInSeconds (6 hours by default): after a longer pause, resume and "
              "run a reconcile with repair.")
    elif args.action == "resume":
        since = datetime.datetime.now(datetime.timezone.utc)
        exporter.set_enabled(True)
        print("resumed: the stream's mapping and the schedule enabled; waiting for the stream to catch up")
        deadline = time.monotonic() + args.wait
        while not exporter.caught_up(since, args.quiet):
            if time.monotonic() > deadline:
                print(f"the stream has not caught up within {args.wait:.0f} s: alarm actions stay off. "
                      f"Run `scripts/pause.py resume --env {args.env}` again (the dashboard shows IteratorAge).")
                return 1
            time.sleep(15)
        exporter.set_alarm_actions(True)
        print(f"caught up: actions on for {', '.join(exporter.alarms)}")
    mappings, rule, alarms = exporter.status()
    print(f"status: mappings {mappings}, schedule {rule}, alarm actions {alarms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
