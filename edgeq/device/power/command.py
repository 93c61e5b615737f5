"""A user-given command that prints watts (an external meter's CLI)."""

from .base import _NUMBER, PowerSource, PowerUnavailable, run_command


class CommandSource(PowerSource):
    """A user command (e.g. reading a USB power meter) that prints the current power in watts."""

    sensor = "command"

    def __init__(self, command):
        if not command:
            raise PowerUnavailable("sensor 'command' needs power.command, the argv of a program printing watts")
        self.argv = list(command)
        self.read()

    def read(self):
        text = run_command(self.argv)
        match = _NUMBER.search(text)
        if not match:
            raise PowerUnavailable("%s printed no number (expected watts): %r" % (" ".join(self.argv), text[:80]))
        return float(match.group(0)), None

    def describe(self):
        return {"command": self.argv}
