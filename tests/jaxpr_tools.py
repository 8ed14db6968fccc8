"""Walks a jaxpr's equations, nested ones (jit, custom VJP, pallas_call bodies) included."""


def equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from equations(inner)
