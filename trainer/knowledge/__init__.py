"""Knowledge-constraint training (posterior regularisation, rule distillation, learnable constraints).

teacher.py      pure functions: categorical teacher, pi schedule, distillation loss, importance weights,
                ESS, reverse-KL generator loss, IRL loss for a learned constraint, rank all-gather,
                chain-structured teacher (forward-backward) for rules between neighbouring labels
logic.py        soft logic over rule values in [0, 1] (Hu et al. 2016)
constraints.py  constraint modules: class consistency, left-right symmetry, learned f_phi, rule confidences
See docs/knowledge_constraints.md and ../shared/notes/knowledge_constraints.md for the method.
"""
