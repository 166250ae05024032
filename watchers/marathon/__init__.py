"""Marathon (Mesos): apps and their tasks -> Snapshots, marathon-lb's labels kept.

translate.py (a pure function from the apps JSON to a Translation), labels.py (marathon-lb's
label values read one by one), apps.py (ports, networking modes and task addresses of the raw
app JSON); the watcher (client, event stream) lives beside them.
"""
