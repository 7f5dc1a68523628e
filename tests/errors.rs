//! One error type: every layer's error converts into `altpatch::Error`
//! with `?`, names its site where it has one, and chains its cause through
//! `source()` down to the poke or OS error.

use std::error::Error as _;

use altpatch::poke::PokeError;
use altpatch::retpoline::{self, Mode, Policy};
use altpatch::{
    DirectPoke, Edit, Error, FaultInjectingPoke, FaultPoint, Plan, PlanError, SyncMethod,
};

/// A data buffer standing in for text (nothing executes it), with a plan
/// over it.
fn plan_over(text: &mut [u8]) -> (usize, Plan) {
    let at = text.as_mut_ptr() as usize;
    // SAFETY: `text` outlives every use of the plan in these tests.
    (at, unsafe { Plan::with_text(at..at + text.len()) })
}

fn direct() -> DirectPoke {
    // SAFETY: the tests write only their own data buffers.
    unsafe { DirectPoke::new(SyncMethod::Cpuid) }
}

/// Every error in `e`'s `source()` chain, outermost first.
fn chain(e: &dyn std::error::Error) -> Vec<String> {
    let mut out = Vec::new();
    let mut next = e.source();
    while let Some(s) = next {
        out.push(s.to_string());
        next = s.source();
    }
    out
}

#[test]
fn a_refused_plan_names_its_site_through_the_one_type() {
    let mut text = [0xccu8; 8];
    let (at, mut plan) = plan_over(&mut text);
    plan.push(Edit::replace(at + 3, &[0x90], &[0xc3]).site("the site"));
    let mut run = || -> Result<(), Error> {
        plan.validate(&direct())?;
        Ok(())
    };
    let e = run().unwrap_err();
    let Error::Plan(inner) = &e else {
        panic!("not a plan error: {e:?}")
    };
    assert!(matches!(inner, PlanError::Unexpected { .. }), "{inner}");
    assert_eq!(e.site(), Some(at + 3));
    assert_eq!(inner.site(), Some(at + 3));
    // Transparent: the same message, no repeated cause.
    assert_eq!(e.to_string(), inner.to_string());
    assert!(e.to_string().contains("the site"), "{e}");
    assert!(e.source().is_none());
    assert_eq!(text, [0xcc; 8], "a refused plan writes nothing");
}

#[test]
fn a_poke_failure_is_the_source_of_the_plan_error() {
    let mut text = [0x90u8; 8];
    let (at, mut plan) = plan_over(&mut text);
    plan.push(Edit::replace(at, &[0x90], &[0xc3]).site("first"));
    plan.push(Edit::replace(at + 4, &[0x90], &[0xc3]).site("second"));
    let mut poke = FaultInjectingPoke::new(direct(), FaultPoint::Write(1));
    // SAFETY: the poke writes only `text`, which nothing executes.
    let plan_error = unsafe { plan.apply(&mut poke) }.unwrap_err();
    assert!(poke.fired());
    let wrapped = retpoline::Error::Plan(plan_error);
    let e = Error::from(wrapped);
    // The chain: the error and the retpoline variant are transparent (they
    // display as the plan error), so the one cause below is the poke
    // error, named once.
    assert!(e.to_string().contains("second"), "{e}");
    let poke_error = e
        .source()
        .and_then(|s| s.downcast_ref::<PokeError>())
        .expect("the poke error is the cause");
    assert!(
        matches!(poke_error, PokeError::Injected { .. }),
        "{poke_error}"
    );
    assert_eq!(chain(&e), [poke_error.to_string()]);
    assert_eq!(text, [0x90; 8], "the batch was rolled back");
}

#[test]
fn the_process_one_liners_return_typed_errors() {
    let policy = Policy::new(Mode::Plain, "test");
    // No loaded object contains address 1: a typed error, not a string.
    // SAFETY: nothing is loaded there, so nothing can be unloaded.
    let e = unsafe { retpoline::apply_loaded(1, &policy) }.unwrap_err();
    assert!(matches!(e, retpoline::Error::Load(_)), "{e:?}");
    let cause = e.source().expect("the load error is the cause");
    assert!(
        cause.downcast_ref::<altpatch::LoadError>().is_some(),
        "{cause}"
    );
    let e = Error::from(e);
    assert!(e.to_string().contains("0x1"), "{e}");
    assert!(e.site().is_none());
}

#[test]
fn each_layer_names_the_site_it_knows() {
    let e = Error::from(retpoline::Error::RspSite { site: 0x1234 });
    assert_eq!(e.site(), Some(0x1234));
    let e = Error::from(PokeError::NotLanded { addr: 0x42 });
    assert_eq!(e.site(), Some(0x42));
    let e = Error::from(PokeError::Unsupported("nothing"));
    assert_eq!(e.site(), None);
}
