"""A freedesktop Notifications service for tests, on a private session bus.

Run with the system's python3 (Debian's python3-dbus and python3-gi; the
test venv has neither): ``/usr/bin/python3 notifications.py RECORD_FILE``
with DBUS_SESSION_BUS_ADDRESS naming the test's own bus. It owns
``org.freedesktop.Notifications``, answers ``Notify`` the way a desktop's
notification daemon does (a new id), appends each call to RECORD_FILE as
one JSON line, and prints ``ready`` once it owns the name.
"""

from __future__ import annotations

import json
import sys

import dbus
import dbus.service
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib

NAME = "org.freedesktop.Notifications"
PATH = "/org/freedesktop/Notifications"


class Notifications(dbus.service.Object):
    def __init__(self, bus: dbus.Bus, record: str) -> None:
        super().__init__(bus, PATH)
        self.record = record
        self.last_id = 0

    @dbus.service.method(NAME, in_signature="susssasa{sv}i", out_signature="u")
    def Notify(self, app_name, replaces_id, app_icon, summary, body, actions, hints, expire_timeout):  # noqa: N802
        self.last_id += 1
        call = {
            "app_name": str(app_name),
            "replaces_id": int(replaces_id),
            "summary": str(summary),
            "body": str(body),
            "actions": [str(a) for a in actions],
            "expire_timeout": int(expire_timeout),
        }
        with open(self.record, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(call) + "\n")
        return dbus.UInt32(self.last_id)

    @dbus.service.method(NAME, in_signature="", out_signature="as")
    def GetCapabilities(self):  # noqa: N802
        return ["body"]

    @dbus.service.method(NAME, in_signature="", out_signature="ssss")
    def GetServerInformation(self):  # noqa: N802
        return ("lore-test-notifications", "lore-service tests", "1", "1.2")

    @dbus.service.method(NAME, in_signature="u", out_signature="")
    def CloseNotification(self, notification_id):  # noqa: N802
        return None


def main() -> None:
    DBusGMainLoop(set_as_default=True)
    bus = dbus.SessionBus()
    name = dbus.service.BusName(NAME, bus, do_not_queue=True)
    service = Notifications(bus, sys.argv[1])
    print("ready", flush=True)
    loop = GLib.MainLoop()
    try:
        loop.run()
    finally:
        del service, name


if __name__ == "__main__":
    main()
