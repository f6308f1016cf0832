"""Mirrors modules/extra_networks.py: the ExtraNetwork API, registry and prompt parsing."""
import re
from collections import defaultdict

extra_network_registry = {}
extra_network_aliases = {}


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split('=', 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


class ExtraNetwork:
    def __init__(self, name):
        self.name = name


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def register_extra_network_alias(extra_network, alias):
    extra_network_aliases[alias] = extra_network


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def parse_prompts(prompts):
    res, extra_data = [], None
    for prompt in prompts:
        found = defaultdict(list)

        def take(m, found=found):
            found[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
            return ""

        res.append(re.sub(re_extra_net, take, prompt))
        if extra_data is None:
            extra_data = found
    return res, extra_data


def activate(p, extra_network_data):
    """Mirrors activate(): mentioned networks get their params, every other registered one gets []."""
    done = []
    for name, args in extra_network_data.items():
        net = extra_network_registry.get(name) or extra_network_aliases.get(name)
        if net is not None:
            net.activate(p, args)
            done.append(net)
    for net in extra_network_registry.values():
        if net not in done:
            net.activate(p, [])
