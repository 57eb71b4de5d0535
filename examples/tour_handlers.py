import orch8


@orch8.handler("greet")
def greet(ctx, params):
    # ctx: instance_id, sequence, step_id, attempt (1 = first try), input, steps (earlier outputs)
    return {"greeting": f"{params['word']}, {ctx.input['name']}"}
