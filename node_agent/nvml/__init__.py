from gpumesh.operator.render import X
Y: str = X
